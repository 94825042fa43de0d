// The playground sends one POST /v1/images/edits, built the way any client builds it
// (multipart, with bracket fields for nested options), and shows what came back.
// It talks to this origin only; the page's Content-Security-Policy enforces that too.
"use strict";

(() => {
  const MODEL = "recraft-crisp-upscale";
  const KEY_STORE = "upscale-gateway.api-key"; // sessionStorage: gone when the tab closes
  const LOSSY = new Set(["jpeg", "webp", "avif"]); // output_compression is ignored otherwise

  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const fileInput = $("file");
  const drop = $("drop");
  const stage = $("stage");
  const input = $("input");
  const output = $("output");
  const slider = $("slider");
  const run = $("run");
  const key = $("key");
  const format = $("format");
  const compression = $("compression");
  const stats = ["out-size", "provider", "cost", "attempts", "cache", "elapsed"];

  let file = null;
  let inputUrl = null;
  let outputUrl = null; // a blob: URL of ours (b64_json), revoked when replaced

  const setState = (state) => {
    document.body.dataset.state = state;
  };
  const sizeText = (img) => `${img.naturalWidth}×${img.naturalHeight}`;
  const kib = (n) =>
    n < 1048576 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / 1048576).toFixed(2)} MiB`;
  // Six places as the x-upscale-cost-usd header has them, less up to three trailing zeros.
  const usd = (v) => `$${Number(v).toFixed(6).replace(/0{1,3}$/, "")}`;

  function hideMessages() {
    $("error").hidden = true;
    $("key-prompt").hidden = true;
  }

  function showError(text, detail) {
    const box = $("error");
    box.replaceChildren();
    const title = document.createElement("strong");
    title.textContent = text;
    box.append(title);
    if (detail) {
      const p = document.createElement("p");
      p.textContent = detail;
      box.append(p);
    }
    box.hidden = false;
    setState("error");
  }

  function clearOutput() {
    if (outputUrl) URL.revokeObjectURL(outputUrl);
    outputUrl = null;
    output.removeAttribute("src");
    stage.classList.remove("done");
    slider.disabled = true;
    for (const id of stats) $(id).textContent = "–";
    $("download").hidden = true;
    $("no-download").hidden = false;
  }

  function pick(chosen) {
    if (!chosen) return;
    file = chosen;
    hideMessages();
    clearOutput();
    $("file-name").textContent = `${chosen.name || "image"} · ${kib(chosen.size)}`;
    $("in-size").textContent = "–";
    if (inputUrl) URL.revokeObjectURL(inputUrl);
    inputUrl = URL.createObjectURL(chosen);
    input.src = inputUrl;
    stage.classList.remove("empty");
    $("expect").textContent = "";
    run.disabled = false;
    setState("idle");
  }

  // Both images are laid out in one box of the input's proportions, so they are shown at
  // the same size whatever their pixel counts.
  function fit(img) {
    if (!img.naturalWidth || !img.naturalHeight) return;
    stage.style.setProperty("--ratio", String(img.naturalWidth / img.naturalHeight));
  }

  function expected() {
    const hint = $("expect");
    if (!input.naturalWidth || $("by-size").checked) {
      hint.textContent = $("by-size").checked ? "The largest size that fits the box." : "";
      return;
    }
    const s = Number($("scale").value);
    hint.textContent =
      s > 0 ? `→ ${Math.round(input.naturalWidth * s)}×${Math.round(input.naturalHeight * s)}` : "";
  }

  function syncControls() {
    const bySize = $("by-size").checked;
    $("size").disabled = !bySize;
    $("scale").disabled = bySize;
    compression.disabled = !LOSSY.has(format.value);
    $("compression-value").textContent = compression.disabled ? "n/a" : compression.value;
    expected();
  }

  function buildForm() {
    const body = new FormData();
    body.append("model", MODEL);
    body.append("image", file, file.name || "image");
    if ($("by-size").checked) {
      const size = $("size").value.trim();
      if (size) body.append("size", size);
    } else if ($("scale").value.trim()) {
      body.append("scale_factor", $("scale").value.trim());
    }
    body.append("output_format", format.value);
    if (LOSSY.has(format.value)) body.append("output_compression", compression.value);
    const only = $("provider-pref").value;
    // Multipart has no nested values: the gateway reads bracket names, as curl -F sends them.
    if (only) body.append("provider[only][]", only);
    body.append("response_format", $("response-format").value);
    return body;
  }

  function b64Blob(b64, fmt) {
    const raw = atob(b64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i += 1) bytes[i] = raw.charCodeAt(i);
    return URL.createObjectURL(new Blob([bytes], { type: `image/${fmt}` }));
  }

  function loaded(img, src) {
    return new Promise((resolve, reject) => {
      img.onload = () => resolve();
      img.onerror = () => reject(new Error("the browser could not decode the output image"));
      img.src = src;
    });
  }

  function refused(response, body) {
    const error = (body && body.error) || {};
    const message = error.message || `${response.status} ${response.statusText}`;
    if (response.status === 401) {
      $("key-prompt-text").textContent = key.value.trim()
        ? `The key entered was refused: ${message} Check it and run again.`
        : "Enter one of its client keys in “API key” and run again.";
      $("key-prompt").hidden = false;
      setState("needs-key");
      key.focus();
      return;
    }
    const what = [response.status, error.type, error.code].filter(Boolean).join(" · ");
    const parts = [message];
    if (error.param) parts.push(`(field: ${error.param})`);
    const retry = response.headers.get("retry-after");
    if (retry) parts.push(`Retry after ${retry} s.`);
    showError(`The gateway refused the request: ${what}`, parts.join(" "));
  }

  async function submit(event) {
    event.preventDefault();
    if (!file) return;
    hideMessages();
    clearOutput();
    const headers = {};
    const token = key.value.trim();
    if (token) headers.Authorization = `Bearer ${token}`;
    setState("running");
    run.disabled = true;
    $("status").textContent = "Upscaling…";
    const started = performance.now();
    try {
      let response;
      try {
        response = await fetch("/v1/images/edits", { method: "POST", body: buildForm(), headers });
      } catch (err) {
        showError("The gateway could not be reached.", String(err.message || err));
        return;
      }
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        refused(response, body);
        return;
      }
      if (!body || !Array.isArray(body.data) || !body.data.length) {
        showError("The gateway's answer is not an images response.", `HTTP ${response.status}`);
        return;
      }
      const item = body.data[0];
      const src = item.url || (outputUrl = b64Blob(item.b64_json, body.output_format));
      try {
        await loaded(output, src);
      } catch (err) {
        showError("The upscale succeeded, but the output cannot be shown.", err.message);
      }
      const elapsed = performance.now() - started;
      const meta = body.metadata || {};
      const header = (name) => response.headers.get(name) || "";
      const providers =
        meta.providers && meta.providers.length ? meta.providers : [header("x-upscale-provider")];
      const attempts = meta.attempts || header("x-upscale-attempts").split(",").filter(Boolean);
      $("out-size").textContent = output.naturalWidth ? sizeText(output) : body.size || "–";
      $("provider").textContent = providers.filter(Boolean).join(", ") || "–";
      $("cost").textContent = usd(meta.cost_usd ?? header("x-upscale-cost-usd"));
      $("attempts").textContent = attempts.length ? attempts.join(", ") : "none (cached)";
      $("cache").textContent = meta.cache || header("x-upscale-cache") || "–";
      $("elapsed").textContent = `${Math.round(elapsed)} ms`;
      const link = $("download");
      link.href = src;
      link.download = `upscaled.${body.output_format === "jpeg" ? "jpg" : body.output_format}`;
      link.hidden = false;
      $("no-download").hidden = true;
      if (!input.naturalWidth) fit(output); // an input the browser cannot preview
      stage.classList.remove("empty");
      stage.classList.add("done");
      slider.disabled = false;
      if (document.body.dataset.state === "running") setState("done");
    } finally {
      run.disabled = false;
      $("status").textContent = "";
    }
  }

  // Drop zone: a file dropped anywhere on the page is taken, not opened by the browser.
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) pick(e.dataTransfer.files[0]);
  });
  window.addEventListener("paste", (e) => {
    const pasted = [...(e.clipboardData ? e.clipboardData.files : [])];
    if (pasted.length) pick(pasted[0]);
  });

  fileInput.addEventListener("change", () => pick(fileInput.files[0]));
  input.addEventListener("load", () => {
    $("in-size").textContent = sizeText(input);
    fit(input);
    expected();
  });
  input.addEventListener("error", () => {
    if (!input.getAttribute("src")) return;
    // Not decodable here (or not an image): the gateway, which reads the bytes, decides.
    input.removeAttribute("src");
    $("in-size").textContent = "no preview";
    $("placeholder").textContent = "No preview of this file; the gateway will judge it.";
    stage.classList.add("empty");
    expected();
  });
  slider.addEventListener("input", () => stage.style.setProperty("--pos", `${slider.value}%`));
  $("side").addEventListener("change", (e) => {
    stage.classList.toggle("side", e.target.checked);
    $("view-hint").textContent = e.target.checked
      ? "Input and output, side by side at the same size."
      : "Before / after: drag the slider.";
  });
  for (const el of [$("by-scale"), $("by-size"), $("scale"), format, compression]) {
    el.addEventListener("input", syncControls);
  }
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("input", () => {
    const value = key.value.trim();
    if (value) sessionStorage.setItem(KEY_STORE, value);
    else sessionStorage.removeItem(KEY_STORE);
  });
  form.addEventListener("submit", submit);
  syncControls();
})();
