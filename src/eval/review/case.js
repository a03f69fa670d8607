// medseg review: one case in NiiVue, from file:// with no server. The case's own script sets
// window.MEDSEG_CASE (what to show) and window.MEDSEG_VOLUMES (its volumes, base64 NIfTI).
// window.medsegReview exposes the viewer to readers and to scripts/check-review.js.
(function () {
  'use strict';
  const data = window.MEDSEG_CASE;
  const volumes = window.MEDSEG_VOLUMES;
  const state = { ready: false, error: null };
  window.medsegReview = state;
  const $ = (id) => document.getElementById(id);
  if (!window.niivue || !data || !volumes) {
    state.error = 'the viewer or the case data did not load';
    return;
  }
  // Radiology's usual windows, [centre, width] in HU.
  const PRESETS = { soft: [40, 400], lung: [-600, 1500], brain: [40, 80] };
  // Prediction colours by label value (1, 2, …); the truth outline is green, as in medseg's PNGs.
  const PALETTE = [[230, 40, 40], [40, 150, 255], [255, 160, 0], [200, 60, 220], [0, 210, 210],
    [240, 240, 60], [255, 110, 180], [150, 110, 60]];
  const MAP_COLORMAP = { probabilities: 'warm', uncertainty: 'cool', attention: 'hot' };
  // Above this many voxels the 3D render costs more than it shows on a laptop.
  const RENDER_MAX_VOXELS = 256 * 256 * 256;

  // Every label value up to the map's maximum gets a colour, named or not; an organ (a class
  // that is not a lesion class) is drawn faintly so the lesions on it stand out.
  function labelColormap(labels, max, lesionClasses) {
    const cm = { R: [0], G: [0], B: [0], A: [0], I: [0], labels: [labels[0] || 'background'] };
    for (let v = 1; v < Math.max(labels.length, max + 1, 2); v++) {
      const c = PALETTE[(v - 1) % PALETTE.length];
      const lesion = !lesionClasses.length || lesionClasses.includes(v);
      cm.R.push(c[0]); cm.G.push(c[1]); cm.B.push(c[2]); cm.A.push(lesion ? 255 : 70); cm.I.push(v);
      cm.labels.push(labels[v] || String(v));
    }
    return cm;
  }

  async function start() {
    $('loading').hidden = false;
    const nv = new niivue.Niivue({
      backColor: [0, 0, 0, 1],
      show3Dcrosshair: true,
      crosshairColor: [1, 1, 0, 0.8],
      // A gap at the crosshair's centre, so the lesion it points at is not hidden under it.
      crosshairGap: 10,
      dragAndDropEnabled: false,
      isColorbar: false,
    });
    await nv.attachTo('gl');
    const byRole = {};
    for (let i = 0; i < data.volumes.length; i++) {
      const v = data.volumes[i];
      byRole[v.role] = await niivue.NVImage.loadFromBase64({ base64: volumes[i], name: v.name });
    }
    const order = [];
    const scan = byRole.scan;
    if (scan) order.push(scan);
    const pred = byRole.prediction;
    if (pred) {
      pred.setColormapLabel(labelColormap(data.labels, Math.round(pred.global_max || 1), data.lesion_classes));
      order.push(pred);
    }
    const truth = byRole.truth;
    if (truth) {
      truth.colormap = 'green';
      truth.cal_min = 0.5;
      truth.cal_max = 1;
      order.push(truth);
    }
    const maps = Object.keys(MAP_COLORMAP).filter((r) => byRole[r]);
    for (const r of maps) {
      const m = byRole[r];
      m.colormap = MAP_COLORMAP[r];
      m.cal_min = 0.05;
      m.cal_max = 1;
      m.opacity = 0;
      order.push(m);
    }
    for (const v of order) nv.addVolume(v);
    const index = (v) => nv.volumes.indexOf(v);
    if (pred) nv.setOpacity(index(pred), 0.5);
    nv.opts.multiplanarShowRender = data.voxels <= RENDER_MAX_VOXELS
      ? niivue.SHOW_RENDER.ALWAYS : niivue.SHOW_RENDER.NEVER;
    // Two by two (three planes and the render) fills a laptop screen better than a row of four.
    nv.opts.multiplanarLayout = niivue.MULTIPLANAR_TYPE.GRID;
    nv.setSliceType(nv.sliceTypeMultiplanar);
    // Slices in world space: an oblique scan is shown rotated, as it lies, and the crosshair's mm
    // are the patient's (in voxel space NiiVue would show the grid unrotated).
    nv.setSliceMM(true);
    nv.onLocationChange = (d) => {
      state.location = d;
      $('location').textContent = d && d.string ? 'crosshair (RAS mm) = scan, prediction, …: ' + d.string : '';
    };

    // Controls.
    const preset = $('preset');
    if (!scan || data.modality === 'labels') preset.parentElement.hidden = true;
    function setWindow(name) {
      if (!scan) return;
      if (name === 'auto') {
        scan.cal_min = scan.robust_min;
        scan.cal_max = scan.robust_max;
      } else {
        const [c, w] = PRESETS[name];
        scan.cal_min = c - w / 2;
        scan.cal_max = c + w / 2;
      }
      nv.updateGLVolume();
    }
    preset.value = data.modality === 'ct' ? 'soft' : 'auto';
    setWindow(preset.value);
    preset.addEventListener('change', () => setWindow(preset.value));
    const opacity = $('opacity');
    if (!pred) opacity.parentElement.hidden = true;
    opacity.addEventListener('input', () => nv.setOpacity(index(pred), Number(opacity.value)));
    if (truth) {
      $('truth-toggle').hidden = false;
      $('truth').addEventListener('change', (e) => nv.setOpacity(index(truth), e.target.checked ? 1 : 0));
    }
    if (maps.length) {
      const select = $('map');
      for (const r of maps) select.add(new Option(r, r));
      $('map-choice').hidden = false;
      select.addEventListener('change', () => {
        for (const r of maps) nv.setOpacity(index(byRole[r]), r === select.value ? 0.6 : 0);
      });
    }

    // Lesion rows move the crosshair to the lesion's centroid (RAS mm, as NIfTI's sform).
    function goTo(mm) {
      nv.scene.crosshairPos = nv.mm2frac(mm);
      nv.drawScene();
      nv.createOnLocationChange();
    }
    const rows = Array.from(document.querySelectorAll('tr.lesion'));
    for (const row of rows) {
      const go = () => {
        rows.forEach((r) => r.classList.remove('current'));
        row.classList.add('current');
        goTo(row.dataset.mm.split(',').map(Number));
      };
      row.addEventListener('click', go);
      row.addEventListener('keydown', (e) => { if (e.key === 'Enter') go(); });
    }

    state.nv = nv;
    state.goTo = goTo;
    // Where the views' crosshair is, as NiiVue reports it to the page (onLocationChange), and the
    // value it reports there for a layer ('scan', 'prediction', …).
    state.crosshairMm = () => Array.from(state.location.mm).slice(0, 3);
    state.valueAtCrosshair = (role) => {
      const img = byRole[role];
      const v = img && state.location.values[index(img)];
      return v ? v.value : null;
    };
    if (rows.length) rows[0].classList.add('current');
    if (rows.length) goTo(rows[0].dataset.mm.split(',').map(Number));
    $('loading').hidden = true;
    $('viewer').hidden = false;
    $('static').hidden = true;
    nv.resizeListener();
    state.ready = true;
  }

  start().catch((e) => {
    state.error = String(e);
    $('loading').textContent = 'The viewer could not show this case (' + e + '); the picture below is the static one.';
  });
})();
