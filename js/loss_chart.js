// A small, dependency-free loss chart on a <canvas>: instance and prior loss per step, raw values
// as thin lines under an exponential moving average (diffusion losses are noisy step to step).
// Loaded by ComfyUI as an extension module too; it only exports functions.

const COLORS = { instance: "#4ea1ff", prior: "#ffa94d", grid: "rgba(255,255,255,0.10)", text: "#a8a8a8" };

/** Exponential moving average that ignores missing values (null where the input is null). */
export function ema(values, alpha = 0.15) {
  let acc = null;
  return values.map((v) => {
    if (v == null || !Number.isFinite(v)) return null;
    acc = acc == null ? v : acc + alpha * (v - acc);
    return acc;
  });
}

/** The y range: 0 up to a high percentile, so one spike does not flatten the whole curve. */
function yMax(series) {
  const vals = series.flat().filter((v) => v != null && Number.isFinite(v)).sort((a, b) => a - b);
  if (!vals.length) return 1;
  const hi = vals[Math.min(vals.length - 1, Math.floor(vals.length * 0.98))];
  return hi > 0 ? hi * 1.1 : 1;
}

function niceTicks(max, count = 3) {
  const raw = max / count;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = 0; v <= max + 1e-12; v += step) ticks.push(v);
  return ticks;
}

function fmt(v) {
  if (v === 0) return "0";
  if (Math.abs(v) >= 100 || Math.abs(v) < 0.01) return v.toExponential(0);
  return String(+v.toPrecision(2));
}

/**
 * Draw `points` ([[step, loss, instance_loss, prior_loss|null], ...]) into `canvas`, x from 0 to
 * `total` steps. The canvas is sized to its CSS box times `pixelRatio` for sharp lines; `emptyText`
 * is shown while there is no point.
 */
export function drawLossChart(canvas, points, total, pixelRatio = window.devicePixelRatio || 1,
                              emptyText = "waiting for the first step…") {
  const w = Math.max(1, canvas.clientWidth), h = Math.max(1, canvas.clientHeight);
  const pr = Math.min(4, Math.max(1, pixelRatio));
  if (canvas.width !== Math.round(w * pr) || canvas.height !== Math.round(h * pr)) {
    canvas.width = Math.round(w * pr);
    canvas.height = Math.round(h * pr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(pr, 0, 0, pr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = "10px sans-serif";
  const pad = { l: 34, r: 6, t: 14, b: 14 };
  const pw = w - pad.l - pad.r, ph = h - pad.t - pad.b;
  if (pw < 10 || ph < 10) return;

  const steps = points.map((p) => p[0]);
  const inst = points.map((p) => p[2]);
  const prior = points.map((p) => p[3]);
  const hasPrior = prior.some((v) => v != null);
  const xmax = Math.max(1, total || 0, steps.length ? steps[steps.length - 1] : 1);
  const ymax = yMax(hasPrior ? [inst, prior] : [inst]);
  const X = (s) => pad.l + (s / xmax) * pw;
  const Y = (v) => pad.t + ph - (Math.min(v, ymax) / ymax) * ph;

  // grid and labels
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.text;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const t of niceTicks(ymax)) {
    const y = Math.round(Y(t)) + 0.5;
    ctx.beginPath(); ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + pw, y); ctx.stroke();
    ctx.fillText(fmt(t), pad.l - 4, y);
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  ctx.fillText("0", pad.l, pad.t + ph + 2);
  ctx.textAlign = "right";
  ctx.fillText(`${xmax} steps`, pad.l + pw, pad.t + ph + 2);

  const line = (values, color, width, alpha) => {
    ctx.strokeStyle = color;
    ctx.globalAlpha = alpha;
    ctx.lineWidth = width;
    ctx.beginPath();
    let pen = false;
    values.forEach((v, i) => {
      if (v == null || !Number.isFinite(v)) { pen = false; return; }
      const x = X(steps[i]), y = Y(v);
      if (pen) ctx.lineTo(x, y); else { ctx.moveTo(x, y); pen = true; }
    });
    ctx.stroke();
    ctx.globalAlpha = 1;
  };
  const series = [["instance", inst, COLORS.instance]];
  if (hasPrior) series.push(["prior", prior, COLORS.prior]);
  for (const [, vals, color] of series) line(vals, color, 1, 0.35);
  for (const [, vals, color] of series) line(ema(vals), color, 2, 1);
  if (points.length === 1) {  // a single point is not a line: show it as a dot
    for (const [, vals, color] of series) {
      if (vals[0] == null) continue;
      ctx.fillStyle = color;
      ctx.beginPath(); ctx.arc(X(steps[0]), Y(vals[0]), 2.5, 0, 2 * Math.PI); ctx.fill();
    }
  }

  // legend
  ctx.textAlign = "left";
  ctx.textBaseline = "top";
  let lx = pad.l + 4;
  for (const [name, , color] of series) {
    ctx.fillStyle = color;
    ctx.fillRect(lx, 3, 10, 3);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(`${name} loss`, lx + 13, 0);
    lx += 18 + ctx.measureText(`${name} loss`).width + 8;
  }
  if (!points.length) {
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(emptyText, pad.l + pw / 2, pad.t + ph / 2);
  }
}
