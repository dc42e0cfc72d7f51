// The page of `loracli serve`: pick a run, try it, read its card. Everything shown that comes
// from a run or a request goes in through textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let runs = {};

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem("loracli-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const response = await fetch(path, opts);
  if (response.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs its API key: type it in the box above");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function loadRuns() {
  try {
    const list = (await (await api("/v1/models")).json()).data;
    const select = $("run");
    select.textContent = "";
    runs = {};
    for (const run of list) {
      runs[run.id] = run;
      const option = document.createElement("option");
      option.value = run.id;
      option.textContent = run.id + " (" + run.loracli.task + ")";
      select.appendChild(option);
    }
    status(list.length + " run(s)");
    await pick();
  } catch (e) {
    status(e.message, true);
  }
}

async function pick() {
  const run = runs[$("run").value];
  if (!run) return;
  const kind = run.loracli.task === "image-classification" ? "image" : (run.loracli.task === "causal-lm" ? "generate" : "text");
  $("image-input").hidden = kind !== "image";
  $("text-input").hidden = kind === "image";
  $("gen-options").hidden = kind !== "generate";
  $("go").textContent = kind === "generate" ? "Generate" : "Classify";
  $("results").textContent = "";
  $("completion").hidden = true;
  await showCard(run.id);
}

async function showCard(id) {
  const title = $("card-title"), facts = $("card-facts"), metrics = $("card-metrics"), plots = $("card-plots");
  title.textContent = id;
  facts.textContent = ""; metrics.textContent = ""; plots.textContent = "";
  const model = await (await api("/v1/models/" + encodeURIComponent(id))).json();
  const info = model.loracli;
  const rows = [["task", info.task], ["method", info.method], ["base", info.base],
                ["labels", info.labels ? info.labels.length + ": " + info.labels.slice(0, 12).join(", ") : "none"],
                ["adapter", Object.entries(model.card.options || {}).map(([k, v]) => k + "=" + v).join(", ")],
                ["shares its base with", info.shares_base_with.join(", ") || "no other run"],
                ["batching", info.mixed_batches ? "mixed with other runs on its base" : "batches of its own"],
                ["run folder", model.card.run_dir]];
  for (const [name, value] of rows) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = name; dd.textContent = String(value);
    facts.append(dt, dd);
  }
  for (const [name, value] of Object.entries(model.card.eval || {})) {
    const tr = document.createElement("tr"), a = document.createElement("td"), b = document.createElement("td");
    a.textContent = name;
    b.textContent = Number.isInteger(value) ? String(value) : Number(value).toFixed(4);
    tr.append(a, b);
    metrics.appendChild(tr);
  }
  for (const url of model.card.plots) {
    const blob = await (await api(url)).blob();
    const img = document.createElement("img");
    img.alt = url.split("/").pop();
    img.src = URL.createObjectURL(blob);
    plots.appendChild(img);
  }
}

function showClasses(top) {
  const list = $("results");
  list.textContent = "";
  for (const item of top) {
    const li = document.createElement("li");
    li.dataset.label = item.label;
    const name = document.createElement("span"), track = document.createElement("span");
    const bar = document.createElement("span"), value = document.createElement("span");
    name.className = "name"; track.className = "track"; bar.className = "bar"; value.className = "value";
    name.textContent = item.label; name.title = item.label;
    bar.style.width = (100 * item.probability).toFixed(1) + "%";
    value.textContent = (100 * item.probability).toFixed(1) + "%";
    track.appendChild(bar);
    li.append(name, track, value);
    list.appendChild(li);
  }
}

async function classifyImage(file) {
  const run = $("run").value;
  const preview = $("preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const form = new FormData();
  form.append("model", run);
  form.append("top_k", "5");
  form.append("image", file);
  status("classifying...");
  try {
    const answer = await (await api("/v1/classify", {method: "POST", body: form})).json();
    showClasses(answer.top_k);
    status("done");
  } catch (e) {
    status(e.message, true);
  }
}

async function runText() {
  const run = runs[$("run").value];
  const text = $("text").value;
  if (run.loracli.task === "causal-lm") return generate(run.id, text);
  status("classifying...");
  try {
    const answer = await (await api("/v1/classify", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: run.id, text: text, top_k: 5}),
    })).json();
    showClasses(answer.top_k);
    status("done");
  } catch (e) {
    status(e.message, true);
  }
}

async function generate(run, prompt) {
  const out = $("completion");
  out.hidden = false;
  out.textContent = "";
  status("generating...");
  try {
    const response = await api("/v1/completions", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({model: run, prompt: prompt, stream: true,
                            max_tokens: Number($("max-tokens").value) || 64,
                            temperature: Number($("temperature").value) || 0}),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { status("done"); return; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) out.textContent += choice.text;
      }
    }
    status("done");
  } catch (e) {
    status(e.message, true);
  }
}

function setup() {
  $("run").addEventListener("change", () => pick().catch((e) => status(e.message, true)));
  $("key").addEventListener("change", () => { sessionStorage.setItem("loracli-key", $("key").value); loadRuns(); });
  $("file").addEventListener("change", () => { if ($("file").files[0]) classifyImage($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) classifyImage(e.dataTransfer.files[0]);
  });
  $("go").addEventListener("click", runText);
  loadRuns();
}

document.addEventListener("DOMContentLoaded", setup);
