// Small SVG charts (no library): line charts over numeric x (steps, unix seconds) and bar charts.
// Colours come from the stylesheet (.series-0, .series-1, …), so the CSP needs no inline style.

const NS = "http://www.w3.org/2000/svg";
const W = 640;
const H = 240;
const PAD = { left: 56, right: 16, top: 16, bottom: 36 };

function svg(tag, attrs = {}, text = null) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== null) el.textContent = text;
  return el;
}

const plain = (v) => (Math.abs(v) >= 1000 || Number.isInteger(v) ? Math.round(v).toLocaleString() : Number(v.toPrecision(3)).toString());

// "Nice" tick values covering [lo, hi]; whole numbers only when the data are counts.
export function ticks(lo, hi, count = 5, { integer = false } = {}) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function extent(values, { zero = false } = {}) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (zero) lo = Math.min(lo, 0);
  if (lo === hi) {
    const pad = lo === 0 ? 1 : Math.abs(lo) * 0.1;
    lo -= pad;
    hi += pad;
  }
  return [lo, hi];
}

// A <figure> with its caption and the chart's <svg> (returned), replacing what `container` held.
function figure(container, title, ...after) {
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", class: "chart", preserveAspectRatio: "xMidYMid meet" });
  const fig = document.createElement("figure");
  fig.className = "chart-figure";
  if (title) {
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    fig.append(caption);
  }
  fig.append(root, ...after);
  container.replaceChildren(fig);
  return root;
}

export function lineChart(container, { title = "", series = [], xLabel = "", yLabel = "", xFormat = plain, yFormat = plain, zero = false } = {}) {
  let data = series.map((s) => ({ name: s.name, points: [...(s.points || [])] }));
  const legend = document.createElement("ul");
  legend.className = "chart-legend";
  const root = figure(container, title, legend);

  function draw() {
    root.replaceChildren();
    const all = data.flatMap((s) => s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1])));
    root.setAttribute("data-points", String(all.length));
    root.setAttribute("aria-label", `${title || yLabel}: ${all.length} points${data.map((s) => (s.points.length ? `; ${s.name} last ${yFormat(s.points[s.points.length - 1][1])}` : "")).join("")}`);
    legend.replaceChildren(...data.map((s, i) => {
      const li = document.createElement("li");
      li.className = `series-${i}`;
      li.textContent = s.name;
      return li;
    }));
    if (!all.length) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, "No data yet"));
      return;
    }
    const [x0, x1] = extent(all.map((p) => p[0]));
    const [y0, y1] = extent(all.map((p) => p[1]), { zero });
    const yt = ticks(y0, y1, 5, { integer: all.every((p) => Number.isInteger(p[1])) });
    const lo = Math.min(y0, yt[0]);
    const hi = Math.max(y1, yt[yt.length - 1]);
    const sx = (x) => PAD.left + ((x - x0) / (x1 - x0)) * (W - PAD.left - PAD.right);
    const sy = (y) => H - PAD.bottom - ((y - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom);
    const grid = svg("g", { class: "chart-grid" });
    for (const t of yt) {
      grid.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t) }));
      grid.append(svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, yFormat(t)));
    }
    for (const t of ticks(x0, x1, 4)) {
      grid.append(svg("text", { x: sx(t), y: H - PAD.bottom + 16, "text-anchor": "middle" }, xFormat(t)));
    }
    if (xLabel) grid.append(svg("text", { x: W / 2, y: H - 4, "text-anchor": "middle", class: "chart-label" }, xLabel));
    if (yLabel) grid.append(svg("text", { x: 12, y: PAD.top + (H - PAD.top - PAD.bottom) / 2, "text-anchor": "middle", class: "chart-label", transform: `rotate(-90 12 ${PAD.top + (H - PAD.top - PAD.bottom) / 2})` }, yLabel));
    root.append(grid);
    data.forEach((s, i) => {
      const pts = s.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1])).sort((a, b) => a[0] - b[0]);
      if (!pts.length) return;
      const d = pts.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
      root.append(svg("path", { d, class: `line series-${i}` }));
      if (pts.length === 1) root.append(svg("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, class: `dot series-${i}` }));
    });
  }

  draw();
  return {
    element: root,
    update(next) {
      data = next.map((s) => ({ name: s.name, points: [...(s.points || [])] }));
      draw();
    },
    add(name, point) {
      let s = data.find((d) => d.name === name);
      if (!s) {
        s = { name, points: [] };
        data.push(s);
      }
      s.points.push(point);
      draw();
    },
  };
}

export function barChart(container, { title = "", bars = [], yFormat = plain } = {}) {
  const root = figure(container, title);

  function draw(items) {
    root.replaceChildren();
    root.setAttribute("data-points", String(items.length));
    root.setAttribute("aria-label", `${title}: ${items.map((b) => `${b.label} ${yFormat(b.value)}`).join(", ")}`);
    if (!items.length) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, "No data yet"));
      return;
    }
    const integer = items.every((b) => Number.isInteger(b.value));
    const hi = Math.max(...ticks(0, Math.max(...items.map((b) => b.value), 1), 5, { integer }));
    const band = (W - PAD.left - PAD.right) / items.length;
    const sy = (y) => H - PAD.bottom - (y / hi) * (H - PAD.top - PAD.bottom);
    const grid = svg("g", { class: "chart-grid" });
    for (const t of ticks(0, hi, 5, { integer })) {
      grid.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: sy(t), y2: sy(t) }));
      grid.append(svg("text", { x: PAD.left - 6, y: sy(t) + 4, "text-anchor": "end" }, yFormat(t)));
    }
    root.append(grid);
    items.forEach((b, i) => {
      const x = PAD.left + i * band + band * 0.15;
      root.append(svg("rect", { x, y: sy(b.value), width: band * 0.7, height: Math.max(0, sy(0) - sy(b.value)), class: `bar series-${i % 6}` }));
      root.append(svg("text", { x: x + band * 0.35, y: H - PAD.bottom + 16, "text-anchor": "middle" }, b.label.length > 14 ? `${b.label.slice(0, 13)}…` : b.label));
    });
  }

  draw(bars);
  return { element: root, update: draw };
}
