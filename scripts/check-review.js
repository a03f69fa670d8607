// Checks a medseg review page (segment/evaluate --review) in headless Chromium, offline:
//   node scripts/check-review.js REVIEW_DIR SHOTS_DIR [--cases a,b,c] [--expect expect.json]
//     [--fallback NO_VIEWER_REVIEW_DIR] [--max-pages N]
// - every request but file:// is blocked; the pages must load regardless;
// - the index lists every case (--cases);
// - each case page's viewer loads, its canvas is not blank (pixel standard deviation > 8);
// - clicking a lesion row moves NiiVue's crosshair to the row's centroid within one voxel, read
//   back from NiiVue's location report (what its views show); with --expect (lesion centres
//   computed by nibabel), every row's finding and centroid match, and NiiVue reports the
//   prediction's label under the crosshair for TP/FP rows and background for FN rows;
// - the controls act on NiiVue: window presets, prediction opacity, the truth outline's toggle;
//   the index sorts by a clicked column; no page raises a script error;
// - without JavaScript, and without the bundled viewer (--fallback), a case page still shows its
//   static picture and lesion table.
// Screenshots go to SHOTS_DIR. Exit status 1 on the first failed check.
'use strict';
const fs = require('fs');
const path = require('path');
const { chromium } = require('playwright-core');

const args = process.argv.slice(2);
const opt = (name) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : undefined; };
const [reviewDir, shots] = args;
const expect = opt('--expect') ? JSON.parse(fs.readFileSync(opt('--expect'), 'utf8')) : null;
const cases = opt('--cases') ? opt('--cases').split(',').filter(Boolean) : null;
const maxPages = Number(opt('--max-pages') || 8);
fs.mkdirSync(shots, { recursive: true });
const url = (p) => 'file://' + path.resolve(p);
let failures = 0;
const check = (ok, what) => {
  console.log((ok ? 'ok    ' : 'FAIL  ') + what);
  if (!ok) failures++;
};

const scriptErrors = [];
async function open(context, file) {
  const page = await context.newPage();
  page.on('pageerror', (e) => scriptErrors.push(`${path.basename(file)}: ${e.message}`));
  await page.goto(url(file));
  return page;
}

async function checkCase(context, file, name) {
  const page = await open(context, file);
  await page.waitForFunction(() => window.medsegReview && (window.medsegReview.ready || window.medsegReview.error),
    null, { timeout: 120000 });
  const error = await page.evaluate(() => window.medsegReview.error);
  check(!error, `${name}: viewer loaded${error ? ' (' + error + ')' : ''}`);
  if (error) return page.close();
  // Canvas variance, read straight after a draw (the drawing buffer is not preserved).
  const stats = await page.evaluate(() => {
    const nv = window.medsegReview.nv;
    nv.drawScene();
    const gl = nv.gl;
    const w = gl.drawingBufferWidth, h = gl.drawingBufferHeight;
    const px = new Uint8Array(w * h * 4);
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, px);
    let s = 0, s2 = 0;
    const n = w * h;
    for (let i = 0; i < px.length; i += 4) {
      const y = 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
      s += y; s2 += y * y;
    }
    const mean = s / n;
    return { w, h, std: Math.sqrt(Math.max(0, s2 / n - mean * mean)) };
  });
  check(stats.std > 8, `${name}: canvas ${stats.w}x${stats.h} not blank (pixel std ${stats.std.toFixed(1)})`);
  const rows = await page.$$('tr.lesion');
  const voxel = await page.evaluate(() => {
    const d = window.medsegReview.nv.volumes[0].pixDims;
    return Math.max(d[1], d[2], d[3]);
  });
  const want = expect && expect[name];
  if (want) check(rows.length === want.length, `${name}: ${rows.length} lesion rows, expected ${want.length}`);
  const unmatched = want ? want.slice() : null;
  for (let r = 0; r < rows.length; r++) {
    if (r > 0 && !want) break; // without expectations the first row is enough
    await rows[r].click();
    const got = await page.evaluate(() => ({
      mm: window.medsegReview.crosshairMm(),
      pred: window.medsegReview.valueAtCrosshair('prediction'),
    }));
    const rowMm = (await rows[r].getAttribute('data-mm')).split(',').map(Number);
    const finding = ((await rows[r].getAttribute('class')).match(/\b(tp|fp|fn)\b/) || [])[1];
    const dist = (a, b) => Math.hypot(a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    check(dist(got.mm, rowMm) <= voxel,
      `${name}: row ${r + 1} crosshair at [${got.mm.map((v) => v.toFixed(2))}] mm, row centroid [${rowMm.map((v) => v.toFixed(2))}], ${dist(got.mm, rowMm).toFixed(3)} mm apart (voxel ${voxel.toFixed(2)} mm)`);
    if (want) {
      const at = unmatched.findIndex((w) => w.finding.toLowerCase() === finding && dist(w.centroid_mm, got.mm) <= voxel);
      check(at >= 0, `${name}: row ${r + 1} (${finding}) lands within one voxel of a ${finding} lesion placed by nibabel`);
      if (at >= 0) unmatched.splice(at, 1);
      // NiiVue's own report of the crosshair's voxel: a found or false lesion is predicted there,
      // a missed one is not.
      const labelled = finding === 'fn' ? got.pred === 0 : got.pred >= 1;
      check(labelled, `${name}: row ${r + 1} (${finding}) prediction label under the crosshair, as NiiVue reports it, is ${got.pred}`);
    }
    if (r === 0) await page.screenshot({ path: path.join(shots, `${name}.png`) });
  }
  if (!rows.length) await page.screenshot({ path: path.join(shots, `${name}.png`) });
  await checkControls(page, name);
  await page.close();
}

// The page's controls change what NiiVue draws.
async function checkControls(page, name) {
  const scanPresets = await page.$eval('#preset', (s) => !s.parentElement.hidden);
  if (scanPresets) {
    await page.selectOption('#preset', 'lung');
    const cal = await page.evaluate(() => [window.medsegReview.nv.volumes[0].cal_min, window.medsegReview.nv.volumes[0].cal_max]);
    check(cal[0] === -1350 && cal[1] === 150, `${name}: the lung preset sets the window to [${cal}] (want [-1350,150])`);
    await page.selectOption('#preset', 'auto');
  }
  const roles = await page.evaluate(() => window.MEDSEG_CASE.volumes.map((v) => v.role));
  const opacity = (role) => page.evaluate((i) => window.medsegReview.nv.volumes[i].opacity, roles.indexOf(role));
  if (roles.includes('prediction')) {
    await page.$eval('#opacity', (el) => { el.value = '0.2'; el.dispatchEvent(new Event('input')); });
    const o = await opacity('prediction');
    check(Math.abs(o - 0.2) < 1e-6, `${name}: the opacity slider sets the prediction's opacity to ${o}`);
  }
  if (roles.includes('truth')) {
    await page.click('#truth');
    const o = await opacity('truth');
    check(o === 0, `${name}: unticking the truth outline hides it (opacity ${o})`);
    await page.click('#truth');
  }
}

async function checkStatic(context, file, what) {
  const page = await open(context, file);
  await page.waitForLoadState('load');
  const s = await page.evaluate(() => {
    const img = document.querySelector('#static img');
    const fig = document.getElementById('static');
    return {
      shown: !!fig && !fig.hidden && img.complete && img.naturalWidth > 0,
      rows: document.querySelectorAll('tr.lesion').length,
    };
  });
  check(s.shown, `${what}: static picture shown`);
  check(s.rows > 0, `${what}: lesion table has ${s.rows} rows`);
  await page.screenshot({ path: path.join(shots, what.replace(/\W+/g, '-') + '.png') });
  await page.close();
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'],
  });
  const blocked = [];
  const offline = async (context) => {
    await context.route('**/*', (route) => {
      const u = route.request().url();
      if (u.startsWith('file://') || u.startsWith('data:') || u.startsWith('blob:')) return route.continue();
      blocked.push(u);
      return route.abort();
    });
    return context;
  };
  const context = await offline(await browser.newContext({ viewport: { width: 1366, height: 800 } }));
  const index = await open(context, path.join(reviewDir, 'index.html'));
  const listed = await index.$$eval('#cases tbody tr td:first-child a', (as) => as.map((a) => [a.textContent, a.getAttribute('href')]));
  // Sorting: the case column, clicked, orders the names; clicked again, reverses them.
  const names = () => index.$$eval('#cases tbody tr td:first-child a', (as) => as.map((a) => a.textContent));
  await index.click('#cases thead th:first-child');
  const up = await names();
  await index.click('#cases thead th:first-child');
  const down = await names();
  const sorted = up.slice().sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
  check(JSON.stringify(up) === JSON.stringify(sorted) && JSON.stringify(down) === JSON.stringify(sorted.slice().reverse()),
    `the index sorts by case name both ways (${up.join(' ')})`);
  await index.screenshot({ path: path.join(shots, 'index.png'), fullPage: true });
  if (cases) {
    const names = listed.map((l) => l[0]);
    check(cases.length === names.length && cases.every((c) => names.includes(c)),
      `index lists ${names.length} cases: every one of the ${cases.length} expected`);
  } else {
    check(listed.length > 0, `index lists ${listed.length} cases`);
  }
  await index.close();
  const pages = listed.slice(0, maxPages);
  let firstWithLesions = null;
  for (const [name, href] of pages) {
    const file = path.join(reviewDir, href);
    await checkCase(context, file, name);
    if (!firstWithLesions && fs.readFileSync(file, 'utf8').includes('class="lesion')) firstWithLesions = href;
  }
  check(scriptErrors.length === 0, `no page raised a script error${scriptErrors.length ? ': ' + scriptErrors.slice(0, 3).join('; ') : ''}`);
  check(blocked.length === 0, `no request left the file system (${blocked.length} blocked${blocked.length ? ': ' + blocked.slice(0, 3).join(' ') : ''})`);
  if (firstWithLesions) {
    const noJs = await offline(await browser.newContext({ javaScriptEnabled: false, viewport: { width: 1366, height: 800 } }));
    await checkStatic(noJs, path.join(reviewDir, firstWithLesions), 'without JavaScript');
    await noJs.close();
    const fallback = opt('--fallback');
    if (fallback) await checkStatic(context, path.join(fallback, firstWithLesions), 'without the viewer');
  }
  await browser.close();
  console.log(failures ? `${failures} checks failed` : 'all review checks passed');
  process.exit(failures ? 1 : 0);
})().catch((e) => { console.error(e); process.exit(1); });
