// medseg review: click a column header to sort a table by it (numbers as numbers, names with
// numbers in them naturally: case2 before case10; blanks last).
(function () {
  'use strict';
  for (const table of document.querySelectorAll('table.sortable')) {
    const heads = Array.from(table.tHead.rows[0].cells);
    heads.forEach((th, col) => {
      th.addEventListener('click', () => {
        const asc = !th.classList.contains('sorted-asc');
        heads.forEach((h) => h.classList.remove('sorted-asc', 'sorted-desc'));
        th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
        const text = th.dataset.type === 'text';
        const value = (row) => {
          const cell = row.cells[col];
          return cell ? (cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent) : '';
        };
        const body = table.tBodies[0];
        const rows = Array.from(body.rows);
        rows.sort((a, b) => {
          const x = value(a), y = value(b);
          if (x === '' || y === '') return (x === '') - (y === '');
          const d = text ? x.localeCompare(y, undefined, { numeric: true }) : Number(x) - Number(y);
          return asc ? d : -d;
        });
        rows.forEach((r) => body.appendChild(r));
      });
    });
  }
})();
