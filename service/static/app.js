// SatSeg viewer: sends the chosen files to the service's own API and draws what comes back.
// Every number on the page comes from the server (/segment, /evaluate); this script only
// decodes COCO RLE into pixels and paints canvases.
"use strict";

(() => {
  // Canvases larger than this (long side) are drawn scaled down; the masks are sampled
  // nearest-neighbour so class edges stay exact at every zoom.
  const MAX_DISPLAY = 2048;
  const UNKNOWN_COLOR = [40, 40, 40];

  const state = {
    model: null, // GET /model
    imageFile: null,
    maskFile: null,
    sourceName: "",
    xhr: null,
    view: null, // everything the drawing functions need for the current result
    apiKey: readKey(),
  };

  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------- API key

  function readKey() {
    try {
      return sessionStorage.getItem("satseg-api-key") || "";
    } catch {
      return "";
    }
  }

  function authHeaders() {
    return state.apiKey ? { "X-API-Key": state.apiKey } : {};
  }

  function askForKey() {
    $("key-form").hidden = false;
    $("api-key").focus();
  }

  // ---------------------------------------------------------------- COCO RLE

  /** Run lengths of a COCO compressed RLE string (pycocotools' rleFrString). */
  function rleCounts(str) {
    const counts = [];
    let p = 0;
    while (p < str.length) {
      let x = 0;
      let k = 0;
      let more = true;
      while (more) {
        if (p >= str.length) throw new Error("truncated RLE string");
        const c = str.charCodeAt(p) - 48;
        x += (c & 0x1f) * 2 ** (5 * k);
        more = (c & 0x20) !== 0;
        p += 1;
        k += 1;
        // The last 5-bit group carries the sign.
        if (!more && (c & 0x10)) x -= 2 ** (5 * k);
      }
      // From the third count on, each is stored as the difference to the one two back.
      if (counts.length > 2) x += counts[counts.length - 2];
      counts.push(x);
    }
    return counts;
  }

  /**
   * Write `value` into the row-major (h*w) array `target` wherever the RLE is 1.
   * COCO RLE runs over pixels in column-major order, starting with a run of zeros.
   */
  function paintRle(rle, target, value) {
    const [h, w] = rle.size;
    const counts = rleCounts(rle.counts);
    let pos = 0;
    for (let i = 0; i < counts.length; i += 1) {
      const n = counts[i];
      if (i % 2 === 1) {
        const end = Math.min(pos + n, h * w);
        let row = pos % h;
        let col = (pos - row) / h;
        for (let k = pos; k < end; k += 1) {
          target[row * w + col] = value;
          row += 1;
          if (row === h) {
            row = 0;
            col += 1;
          }
        }
      }
      pos += n;
    }
    if (pos !== h * w) throw new Error(`RLE covers ${pos} pixels, expected ${h * w}`);
  }

  /** Decode one RLE to a row-major Uint8Array of 0/1 (what pycocotools.mask.decode gives). */
  function decodeRle(rle) {
    const out = new Uint8Array(rle.size[0] * rle.size[1]);
    paintRle(rle, out, 1);
    return out;
  }

  /** Per-class RLEs ({classes: [{id, rle}]}) -> row-major class-id array. */
  function indexFromClasses(segment, fill) {
    const out = new Uint8Array(segment.height * segment.width).fill(fill);
    for (const cls of segment.classes) paintRle(cls.rle, out, cls.id);
    return out;
  }

  // ---------------------------------------------------------------- labels

  function classes() {
    return state.model ? state.model.classes : [];
  }

  function ignoreIndex() {
    return state.model ? state.model.ignore_index : 255;
  }

  /** 256 RGBA entries: class colours, everything else dark grey. */
  function colorTable() {
    const lut = new Uint8ClampedArray(256 * 4);
    for (let v = 0; v < 256; v += 1) {
      lut.set([...UNKNOWN_COLOR, 255], v * 4);
    }
    for (const cls of classes()) lut.set([...cls.color, 255], cls.id * 4);
    return lut;
  }

  function cssColor(rgb) {
    return `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
  }

  /**
   * Read a ground-truth PNG in the browser, for display only (the scores come from /evaluate).
   * Mirrors the server's reading: a grey image whose values are class ids is an index mask;
   * otherwise each colour is looked up among the label colours (unknown -> ignore).
   */
  async function decodeMaskFile(file, width, height) {
    const bitmap = await createImageBitmap(file, {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
    if (bitmap.width !== width || bitmap.height !== height) {
      bitmap.close();
      return null;
    }
    const canvas = new OffscreenCanvas(width, height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    const px = ctx.getImageData(0, 0, width, height).data;
    const ignore = ignoreIndex();
    const ids = new Set(classes().map((c) => c.id));
    let grey = true;
    for (let i = 0; i < px.length && grey; i += 4) {
      const v = px[i];
      grey = v === px[i + 1] && v === px[i + 2] && (ids.has(v) || v === ignore);
    }
    const out = new Uint8Array(width * height);
    if (grey) {
      for (let i = 0, j = 0; j < out.length; i += 4, j += 1) out[j] = px[i];
      return out;
    }
    const byColor = new Map(classes().map((c) => [(c.color[0] << 16) | (c.color[1] << 8) | c.color[2], c.id]));
    for (let i = 0, j = 0; j < out.length; i += 4, j += 1) {
      const id = byColor.get((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
      out[j] = id === undefined ? ignore : id;
    }
    return out;
  }

  // ---------------------------------------------------------------- drawing

  function displaySize(width, height) {
    const scale = Math.min(1, MAX_DISPLAY / Math.max(width, height));
    return [Math.max(1, Math.round(width * scale)), Math.max(1, Math.round(height * scale))];
  }

  function sizeCanvas(canvas, view) {
    canvas.width = view.dw;
    canvas.height = view.dh;
    canvas.style.aspectRatio = `${view.width} / ${view.height}`;
  }

  /** For each display pixel, the index of its source pixel (nearest neighbour). */
  function sampleMap(view) {
    const map = new Uint32Array(view.dw * view.dh);
    const sx = view.width / view.dw;
    const sy = view.height / view.dh;
    for (let y = 0; y < view.dh; y += 1) {
      const row = Math.min(view.height - 1, Math.floor((y + 0.5) * sy)) * view.width;
      for (let x = 0; x < view.dw; x += 1) {
        map[y * view.dw + x] = row + Math.min(view.width - 1, Math.floor((x + 0.5) * sx));
      }
    }
    return map;
  }

  function drawIndex(canvas, index, view) {
    sizeCanvas(canvas, view);
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(view.dw, view.dh);
    const lut = view.lut;
    const data = img.data;
    for (let j = 0; j < view.map.length; j += 1) {
      const o = index[view.map[j]] * 4;
      const i = j * 4;
      data[i] = lut[o];
      data[i + 1] = lut[o + 1];
      data[i + 2] = lut[o + 2];
      data[i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
  }

  function drawInput(view) {
    const canvas = $("canvas-input");
    sizeCanvas(canvas, view);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    if (view.bitmap) {
      ctx.drawImage(view.bitmap, 0, 0, view.dw, view.dh);
    } else {
      ctx.fillStyle = "#9aa3ad";
      ctx.fillRect(0, 0, view.dw, view.dh);
    }
    view.inputPixels = ctx.getImageData(0, 0, view.dw, view.dh).data;
  }

  function drawOverlay() {
    const view = state.view;
    if (!view) return;
    const opacity = Number($("opacity").value) / 100;
    $("opacity-value").textContent = `${Math.round(opacity * 100)}%`;
    const layer = $("overlay-layer").value === "truth" && view.truth ? "truth" : "prediction";
    const canvas = $("canvas-overlay");
    sizeCanvas(canvas, view);
    const ctx = canvas.getContext("2d");
    ctx.drawImage($("canvas-input"), 0, 0);
    ctx.globalAlpha = opacity;
    ctx.drawImage($(layer === "truth" ? "canvas-truth" : "canvas-prediction"), 0, 0);
    ctx.globalAlpha = 1;
  }

  /**
   * Pixels where prediction and truth differ, in the colour of the true class ("missed") or
   * of the predicted class ("false"); agreeing pixels are a faded grey copy of the input and
   * ignore_index pixels are dark.
   */
  function drawErrors() {
    const view = state.view;
    if (!view || !view.truth) return;
    const byTruth = $("error-mode").value !== "prediction";
    const canvas = $("canvas-errors");
    sizeCanvas(canvas, view);
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(view.dw, view.dh);
    const data = img.data;
    const base = view.inputPixels;
    const lut = view.lut;
    const ignore = ignoreIndex();
    for (let j = 0; j < view.map.length; j += 1) {
      const src = view.map[j];
      const t = view.truth[src];
      const p = view.prediction[src];
      const i = j * 4;
      const grey = 0.299 * base[i] + 0.587 * base[i + 1] + 0.114 * base[i + 2];
      if (t === ignore) {
        data[i] = data[i + 1] = data[i + 2] = 0.25 * grey;
      } else if (t === p) {
        data[i] = data[i + 1] = data[i + 2] = 170 + 0.3 * grey;
      } else {
        const o = (byTruth ? t : p) * 4;
        data[i] = lut[o];
        data[i + 1] = lut[o + 1];
        data[i + 2] = lut[o + 2];
      }
      data[i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    renderErrorLegend(byTruth);
  }

  function swatch(rgb) {
    const span = document.createElement("span");
    span.className = "swatch";
    span.style.backgroundColor = cssColor(rgb);
    span.setAttribute("aria-hidden", "true");
    return span;
  }

  /** Legend of the error map; pixel counts are read off the server's confusion matrix. */
  function renderErrorLegend(byTruth) {
    const list = $("error-legend");
    list.replaceChildren();
    const cm = state.view.scores.confusion_matrix;
    const item = (rgb, text) => {
      const li = document.createElement("li");
      li.append(swatch(rgb), document.createTextNode(text));
      list.append(li);
    };
    item([200, 200, 200], "correct (prediction agrees with the truth)");
    classes().forEach((cls, c) => {
      // Rows are truth, columns prediction, both in label order: off-diagonal cells of a row
      // are pixels of that class that were missed, of a column pixels wrongly given it.
      let wrong = 0;
      cm.forEach((row, r) => {
        if (byTruth && r === c) wrong += row.reduce((a, b) => a + b, 0) - row[c];
        if (!byTruth && r !== c) wrong += row[c];
      });
      const what = byTruth
        ? `${cls.name} missed (predicted as another class)`
        : `false ${cls.name} (truly another class)`;
      item(cls.color, `${what}: ${wrong.toLocaleString("en")} px`);
    });
    item([30, 30, 30], "no label in the truth (not scored)");
  }

  // ---------------------------------------------------------------- tables

  function fmtScore(value) {
    return value === null || value === undefined ? "n/a" : value.toFixed(4);
  }

  function scoreCell(value, id) {
    const td = document.createElement("td");
    td.className = "num";
    if (id) td.id = id;
    td.textContent = fmtScore(value);
    // The unrounded value, for anyone (and any test) that wants the server's exact number.
    td.dataset.value = value === null || value === undefined ? "null" : String(value);
    return td;
  }

  function classHeader(cls) {
    const th = document.createElement("th");
    th.scope = "row";
    th.append(swatch(cls.color), document.createTextNode(cls.name));
    return th;
  }

  function numCell(text, id) {
    const td = document.createElement("td");
    td.className = "num";
    if (id) td.id = id;
    td.textContent = text;
    return td;
  }

  /** Class colours with each class's share of the predicted pixels (the server's fraction). */
  function renderLegend(view) {
    const rows = $("legend-rows");
    rows.replaceChildren();
    const predicted = new Map(view.segment.classes.map((c) => [c.id, c]));
    for (const cls of classes()) {
      const tr = document.createElement("tr");
      const pc = predicted.get(cls.id);
      const share = numCell(pc ? `${(pc.fraction * 100).toFixed(2)} %` : "n/a", `share-${cls.id}`);
      share.dataset.value = pc ? String(pc.fraction) : "null";
      tr.append(classHeader(cls), share);
      rows.append(tr);
    }
    const ignoreRow = document.createElement("tr");
    const th = document.createElement("th");
    th.scope = "row";
    th.className = "muted";
    th.append(swatch(UNKNOWN_COLOR), document.createTextNode("no label (ignored)"));
    ignoreRow.append(th, numCell(""));
    rows.append(ignoreRow);
  }

  /** mIoU & co. and the per-class table, straight from /evaluate's answer. */
  function renderScores(view) {
    const headline = $("headline");
    headline.replaceChildren();
    $("scores").hidden = !view.scores;
    const rows = $("class-rows");
    rows.replaceChildren();
    if (!view.scores) return;
    const stat = (label, value, id) => {
      const div = document.createElement("div");
      div.className = "stat";
      const num = document.createElement("span");
      num.className = "stat-value";
      num.id = id;
      num.textContent = fmtScore(value);
      num.dataset.value = value === null ? "null" : String(value);
      const lab = document.createElement("span");
      lab.className = "stat-label";
      lab.textContent = label;
      div.append(num, lab);
      headline.append(div);
    };
    stat("mIoU", view.scores.miou, "miou");
    stat("Mean Dice", view.scores.mean_dice, "mean-dice");
    stat("Pixel accuracy", view.scores.pixel_accuracy, "pixel-accuracy");

    const perClass = new Map(view.scores.per_class.map((s) => [s.id, s]));
    for (const cls of classes()) {
      const s = perClass.get(cls.id);
      if (!s) continue;
      const tr = document.createElement("tr");
      tr.append(
        classHeader(cls),
        numCell(s.support_pixels.toLocaleString("en")),
        numCell(s.predicted_pixels.toLocaleString("en")),
        scoreCell(s.iou, `iou-${cls.id}`),
        scoreCell(s.dice),
        scoreCell(s.precision),
        scoreCell(s.recall),
      );
      rows.append(tr);
    }
  }

  // ---------------------------------------------------------------- requests

  function showError(text, detail) {
    document.body.dataset.state = "error";
    const box = $("error");
    box.replaceChildren();
    const strong = document.createElement("strong");
    strong.textContent = text;
    box.append(strong);
    if (detail) {
      const p = document.createElement("p");
      p.id = "error-message";
      p.textContent = detail;
      box.append(p);
    }
    box.hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
    $("error").replaceChildren();
  }

  let progressTimer = null;

  function setProgress(text, fraction) {
    const bar = $("progress-bar");
    if (fraction === undefined) bar.removeAttribute("value");
    else bar.value = Math.round(fraction * 100);
    $("progress-text").textContent = text;
  }

  function startProgress() {
    $("progress").hidden = false;
    $("cancel-button").hidden = false;
    $("run-button").disabled = true;
    const started = performance.now();
    setProgress("Uploading…", 0);
    // The server sends nothing until it is done, so the page can only say how long it waits.
    progressTimer = setInterval(() => {
      if (state.uploading) return;
      const secs = Math.floor((performance.now() - started) / 1000);
      const hint = secs >= 3 ? " Large images are segmented tile by tile on the server." : "";
      setProgress(`The server is segmenting… ${secs} s.${hint}`);
    }, 500);
  }

  function stopProgress() {
    clearInterval(progressTimer);
    progressTimer = null;
    $("progress").hidden = true;
    $("cancel-button").hidden = true;
    updateButtons();
  }

  /** POST a multipart form with upload progress; resolves to {status, body}. */
  function post(url, form) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      state.xhr = xhr;
      state.uploading = true;
      xhr.open("POST", url);
      for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
      xhr.responseType = "text";
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) setProgress("Uploading…", e.loaded / e.total);
      };
      xhr.upload.onload = () => {
        state.uploading = false;
        setProgress("The server is segmenting…");
      };
      const done = () => {
        state.xhr = null;
        state.uploading = false;
      };
      xhr.onload = () => {
        done();
        let body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch {
          body = null;
        }
        resolve({ status: xhr.status, statusText: xhr.statusText, body });
      };
      xhr.onerror = () => {
        done();
        reject(new Error("Could not reach the service. Is it still running?"));
      };
      xhr.onabort = () => {
        done();
        reject(new DOMException("cancelled", "AbortError"));
      };
      xhr.send(form);
    });
  }

  async function loadModel() {
    const status = $("model-status");
    try {
      const res = await fetch("/model", { headers: { Accept: "application/json", ...authHeaders() } });
      const body = await res.json().catch(() => null);
      if (res.status === 401) {
        status.textContent = `The service needs an API key: ${body && body.error ? body.error.message : ""}`;
        status.className = "model-status bad";
        askForKey();
        return;
      }
      if (!res.ok) {
        const msg = body && body.error ? body.error.message : `${res.status} ${res.statusText}`;
        status.textContent = `Model not ready: ${msg}. Retrying…`;
        status.className = "model-status bad";
        setTimeout(loadModel, 3000);
        return;
      }
      state.model = body;
      const arch = body.arch;
      status.textContent = `Model ready: ${arch.name} ${arch.backbone}, ${arch.num_classes} classes, on ${body.device} (${body.precision})`;
      status.className = "model-status ok";
      updateButtons();
    } catch (err) {
      status.textContent = "Cannot reach the service. Retrying…";
      status.className = "model-status bad";
      setTimeout(loadModel, 3000);
    }
  }

  async function run() {
    if (!state.imageFile || !state.model) return;
    clearError();
    document.body.dataset.state = "busy";
    const image = state.imageFile;
    const mask = state.maskFile;
    const form = new FormData();
    form.append("image", image, image.name);
    if (mask) form.append("mask", mask, mask.name);
    // Browsers cannot show a TIFF: the server sends the RGB it sees (for a multi-band model,
    // its red, green and blue bands, else its first three).
    const tiff = /\.tiff?$/i.test(image.name) || image.type === "image/tiff";
    const url = `${mask ? "/evaluate" : "/segment"}?format=rle${tiff ? "&preview=true" : ""}`;
    startProgress();
    // Decode the picture for display while the server works.
    const bitmapPromise = createImageBitmap(image).catch(() => null);
    let res;
    try {
      res = await post(url, form);
    } catch (err) {
      stopProgress();
      if (err.name !== "AbortError") showError("Request failed", err.message);
      else showError("Cancelled", "The request was cancelled; nothing was drawn.");
      return;
    }
    if (res.status !== 200) {
      stopProgress();
      const e = res.body && res.body.error;
      const title = `The server could not use ${mask ? "these files" : "this file"} (${res.status}${e ? `, ${e.code}` : ""})`;
      showError(title, e ? e.message : `${res.status} ${res.statusText}`);
      // An older result under a new error would read as the answer to these files.
      $("results").hidden = true;
      if (res.status === 401) askForKey();
      return;
    }
    setProgress("Drawing…");
    try {
      const preview = mask ? res.body.pairs[0].preview : res.body.preview;
      const bitmap = (await bitmapPromise) || (await previewBitmap(preview));
      await render(res.body, Boolean(mask), bitmap, mask);
    } catch (err) {
      showError("Could not draw the result", err.message);
    } finally {
      stopProgress();
    }
  }

  /** The server's PNG preview (a data: URL) as an ImageBitmap; null without one. */
  async function previewBitmap(dataUrl) {
    if (!dataUrl) return null;
    const bytes = Uint8Array.from(atob(dataUrl.split(",")[1]), (c) => c.charCodeAt(0));
    return createImageBitmap(new Blob([bytes], { type: "image/png" })).catch(() => null);
  }

  async function render(body, evaluated, bitmap, maskFile) {
    const pair = evaluated ? body.pairs[0] : null;
    const segment = evaluated ? pair.prediction : body;
    const [dw, dh] = displaySize(segment.width, segment.height);
    const view = {
      width: segment.width,
      height: segment.height,
      dw,
      dh,
      bitmap,
      segment,
      scores: pair ? pair.scores : null,
      lut: colorTable(),
      prediction: indexFromClasses(segment, ignoreIndex()),
      truth: null,
      timing: body.timing_ms,
    };
    view.map = sampleMap(view);
    if (pair && pair.truth) {
      view.truth = indexFromClasses(pair.truth, ignoreIndex());
    } else if (maskFile) {
      view.truth = await decodeMaskFile(maskFile, segment.width, segment.height).catch(() => null);
    }
    if (state.view && state.view.bitmap && state.view.bitmap !== bitmap) state.view.bitmap.close();
    state.view = view;

    $("results").hidden = false;
    for (const el of $("results").querySelectorAll(".placeholder")) {
      el.style.aspectRatio = `${view.width} / ${view.height}`;
    }
    $("input-note").hidden = Boolean(bitmap);
    drawInput(view);
    drawIndex($("canvas-prediction"), view.prediction, view);
    const truthCanvas = $("canvas-truth");
    truthCanvas.hidden = !view.truth;
    $("truth-missing").hidden = Boolean(view.truth);
    if (view.truth) drawIndex(truthCanvas, view.truth, view);
    $("truth-missing").textContent = maskFile && !view.truth
      ? "The browser cannot display this mask; the scores below still come from it"
      : "No ground-truth mask given";
    const truthOption = $("overlay-layer").querySelector('option[value="truth"]');
    truthOption.disabled = !view.truth;
    if (!view.truth) $("overlay-layer").value = "prediction";
    drawOverlay();
    $("canvas-errors").hidden = !view.truth;
    $("errors-missing").hidden = Boolean(view.truth);
    $("errors-missing").textContent = maskFile && !view.truth
      ? "The browser cannot display this mask, so there is no error map"
      : "Give a ground-truth mask to see where the prediction is wrong";
    $("error-mode").disabled = !view.truth;
    $("error-legend").replaceChildren();
    $("error-legend-heading").hidden = !view.truth;
    if (view.truth) drawErrors();
    renderLegend(view);
    renderScores(view);

    const timing = view.timing ? `, ${Math.round(view.timing.total)} ms on the server` : "";
    $("results-heading").textContent = `Result: ${state.sourceName}`;
    $("result-summary").textContent = `${view.width} × ${view.height} pixels${timing}.` +
      (evaluated ? " Scored against the given ground truth by /evaluate." : " No ground truth given: prediction only.");
    document.body.dataset.state = "done";
  }

  // ---------------------------------------------------------------- inputs

  function fileSize(bytes) {
    if (bytes < 1024) return `${bytes} bytes`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(0)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  }

  function updateButtons() {
    const busy = Boolean(state.xhr);
    $("run-button").disabled = busy || !state.imageFile || !state.model;
    $("run-button").textContent = state.maskFile ? "Segment and evaluate" : "Segment";
    $("clear-mask").disabled = busy || !state.maskFile;
  }

  function setImage(file) {
    state.imageFile = file;
    state.sourceName = file.name;
    $("image-name").textContent = `${file.name} (${fileSize(file.size)})`;
    $("image-drop").classList.add("has-file");
    updateButtons();
  }

  function setMask(file) {
    state.maskFile = file;
    $("mask-name").textContent = file ? `${file.name} (${fileSize(file.size)})` : "No mask chosen";
    $("mask-drop").classList.toggle("has-file", Boolean(file));
    if (!file) $("mask-input").value = "";
    updateButtons();
  }

  /** Two files dropped together: the one named like a mask (or the PNG beside a photo) is the mask. */
  function assignPair(files) {
    const looksLikeMask = (f) => /mask|label|truth|gt|annot/i.test(f.name);
    let [a, b] = files;
    if (looksLikeMask(a) && !looksLikeMask(b)) [a, b] = [b, a];
    else if (!looksLikeMask(b) && a.type === "image/png" && b.type !== "image/png") [a, b] = [b, a];
    setImage(a);
    setMask(b);
  }

  function wireDropzone(zone, onFiles) {
    zone.addEventListener("dragover", (e) => {
      e.preventDefault();
      zone.classList.add("dragging");
    });
    zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      e.stopPropagation();
      zone.classList.remove("dragging");
      const files = [...e.dataTransfer.files];
      if (files.length >= 2) assignPair(files);
      else if (files.length === 1) onFiles(files[0]);
    });
  }

  async function loadExample(example, button) {
    if (state.xhr) return;
    clearError();
    button.setAttribute("aria-busy", "true");
    try {
      const fetchFile = async (url, name) => {
        const res = await fetch(url);
        if (!res.ok) throw new Error(`${url}: ${res.status} ${res.statusText}`);
        const blob = await res.blob();
        return new File([blob], name, { type: blob.type });
      };
      const ext = (type) => ({ "image/jpeg": ".jpg", "image/png": ".png", "image/tiff": ".tif" })[type] || "";
      const image = await fetchFile(example.image_url, example.name);
      const named = new File([image], example.name + ext(image.type), { type: image.type });
      const mask = example.mask_url ? await fetchFile(example.mask_url, `${example.name}_mask.png`) : null;
      setImage(named);
      setMask(mask);
      state.sourceName = `example ${example.name}`;
    } catch (err) {
      showError("Could not load the example", err.message);
      return;
    } finally {
      button.removeAttribute("aria-busy");
    }
    await run();
  }

  async function loadExamples() {
    const list = $("examples");
    let examples = [];
    try {
      const res = await fetch("/examples");
      if (res.ok) examples = await res.json();
    } catch {
      examples = [];
    }
    list.replaceChildren();
    $("examples-empty").hidden = examples.length > 0;
    list.hidden = examples.length === 0;
    for (const ex of examples) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "example";
      button.dataset.name = ex.name;
      button.setAttribute("aria-label", `Load example ${ex.name}${ex.mask_url ? " with its mask" : ""}`);
      const img = document.createElement("img");
      img.src = ex.thumbnail_url;
      img.alt = "";
      img.loading = "lazy";
      img.width = 96;
      img.height = 96;
      const caption = document.createElement("span");
      caption.textContent = ex.name;
      button.append(img, caption);
      button.addEventListener("click", () => loadExample(ex, button));
      li.append(button);
      list.append(li);
    }
  }

  function init() {
    $("image-input").addEventListener("change", (e) => {
      if (e.target.files.length) setImage(e.target.files[0]);
    });
    $("mask-input").addEventListener("change", (e) => {
      if (e.target.files.length) setMask(e.target.files[0]);
    });
    $("clear-mask").addEventListener("click", () => setMask(null));
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      state.apiKey = $("api-key").value.trim();
      try {
        sessionStorage.setItem("satseg-api-key", state.apiKey);
      } catch {
        // Storage may be off; the key then lasts until the page is reloaded.
      }
      $("key-form").hidden = true;
      clearError();
      loadModel();
    });
    $("upload-form").addEventListener("submit", (e) => {
      e.preventDefault();
      run();
    });
    $("cancel-button").addEventListener("click", () => state.xhr && state.xhr.abort());
    $("opacity").addEventListener("input", drawOverlay);
    $("overlay-layer").addEventListener("change", drawOverlay);
    $("error-mode").addEventListener("change", drawErrors);
    wireDropzone($("image-drop"), setImage);
    wireDropzone($("mask-drop"), setMask);
    // A file dropped anywhere else is taken as the image instead of the browser opening it.
    window.addEventListener("dragover", (e) => e.preventDefault());
    window.addEventListener("drop", (e) => {
      e.preventDefault();
      const files = [...e.dataTransfer.files];
      if (files.length >= 2) assignPair(files);
      else if (files.length === 1) setImage(files[0]);
    });
    loadModel();
    loadExamples();
  }

  // Exposed for tests and for the curious in the developer console.
  window.satseg = { decodeRle, rleCounts, state };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
