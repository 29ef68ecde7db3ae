// tpv playground: reads the store through /v1/vectors and /v1/similarity, and sends the composition set here to
// /v1/classify and /v1/generate whenever the text, a term or a weight changes. No framework, no build step.
"use strict";

const ROOT = document.body.dataset.root || "";
const KEY_SLOT = "tpv-api-key"; // kept for this tab only (sessionStorage), never sent anywhere but this app
const $ = (id) => document.getElementById(id);
let store = { tasks: {}, vectors: [], compositions: [] };
let sent = 0; // the latest update's number: an older answer arriving late is dropped
let timer = null;

function headers() {
  const h = { "content-type": "application/json" };
  const key = sessionStorage.getItem(KEY_SLOT);
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function api(method, path, body) {
  const r = await fetch(`${ROOT}/${path}`, {
    method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({ error: "bad_response", detail: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(`${r.status} ${data.error}: ${data.detail}`);
  return data;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function fill(select, options, keep = []) {
  const current = select.value;
  select.replaceChildren(...keep.map((o) => o.cloneNode(true)),
    ...options.map(([value, text]) => el("option", { value }, text)));
  if ([...select.options].some((o) => o.value === current)) select.value = current;
}

// ---- the store ------------------------------------------------------------------------------------------------

function shortName(id) {
  const v = store.vectors.find((x) => x.vector_id === id);
  return v ? `${v.task}/s${v.origin_seed}` : id;
}

function cellStyle(value) {
  const alpha = Math.min(Math.abs(value), 1).toFixed(3);
  const rgb = value >= 0 ? "33,102,172" : "178,24,43";
  return `background: rgba(${rgb},${alpha}); color: ${Math.abs(value) > 0.6 ? "#fff" : "#111"}`;
}

function heatmap(group) {
  const head = el("tr", {}, el("th", {}, `L=${group.prompt_length}`),
    ...group.vector_ids.map((id) => el("th", { title: id }, shortName(id))));
  const rows = group.vector_ids.map((id, i) => el("tr", {}, el("th", { title: id }, shortName(id)),
    ...group.matrix[i].map((v, j) => el("td", {
      style: cellStyle(v), title: `${id} vs ${group.vector_ids[j]}: ${v.toFixed(4)}`, "data-value": String(v),
    }, v.toFixed(2)))));
  const note = group.left_out ? el("p", {}, `${group.left_out} more vector(s) of this shape not shown`) : "";
  return el("div", { class: "heatmap" }, el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows)), note);
}

async function loadStore() {
  status("loading the store...");
  try {
    store = await api("GET", "v1/vectors");
    const similarity = await api("GET", "v1/similarity");
    $("served").textContent = `${store.backbone_id} · store ${store.store_version.slice(0, 8)}`;
    $("tasks").tBodies[0].replaceChildren(...Object.entries(store.tasks).map(([t, n]) =>
      el("tr", {}, el("td", {}, t), el("td", {}, String(n)))));
    $("compositions").replaceChildren(...store.compositions.map((c) => el("li", {}, c)));
    $("vectors").tBodies[0].replaceChildren(...store.vectors.map((v) => el("tr", {},
      el("td", {}, v.vector_id), el("td", {}, v.task), el("td", {}, String(v.origin_seed)),
      el("td", {}, String(v.prompt_length)), el("td", {}, JSON.stringify(v.metrics)))));
    $("heatmaps").replaceChildren(...similarity.groups.map(heatmap));
    fill($("task"), Object.keys(store.tasks).map((t) => [t, t]), [el("option", { value: "" }, "(none: labels below)")]);
    fill($("composition"), store.compositions.map((c) => [c, `stored: ${c}`]),
      [el("option", { value: "" }, "inline: the terms below")]);
    document.querySelectorAll(".term-ref").forEach(fillTermOptions);
    if (!document.querySelector(".term") && Object.keys(store.tasks).length) addTerm(`task:${Object.keys(store.tasks)[0]}`, 1);
    if (!$("task").value && Object.keys(store.tasks).length) $("task").value = Object.keys(store.tasks)[0];
    status("ready");
    schedule(0);
  } catch (err) {
    status(err.message, true);
  }
}

// ---- the composition ------------------------------------------------------------------------------------------

function fillTermOptions(select) {
  fill(select, [...Object.keys(store.tasks).map((t) => [`task:${t}`, `task ${t} (seed mean)`]),
    ...store.vectors.map((v) => [`vector:${v.vector_id}`, `vector ${v.vector_id}`])]);
}

function addTerm(ref = "", weight = 1) {
  const select = el("select", { class: "term-ref" });
  fillTermOptions(select);
  if (ref) select.value = ref;
  const slider = el("input", { type: "range", class: "weight", min: "-2", max: "2", step: "0.1", value: String(weight) });
  const shown = el("output", { class: "weight-value" }, String(weight));
  const remove = el("button", { type: "button", class: "remove", title: "remove this term" }, "×");
  const row = el("div", { class: "term" }, select, slider, shown, remove);
  slider.addEventListener("input", () => { shown.textContent = slider.value; schedule(); });
  select.addEventListener("change", () => schedule());
  remove.addEventListener("click", () => { row.remove(); schedule(); });
  $("terms").append(row);
}

function composition() {
  if ($("composition").value) return $("composition").value;
  const terms = [...document.querySelectorAll(".term")].map((row) => {
    const [kind, name] = row.querySelector(".term-ref").value.split(/:(.*)/s);
    const term = kind === "task" ? { task: name } : { vector_id: name };
    term.weight = parseFloat(row.querySelector(".weight").value);
    return term;
  });
  return { terms, origin_seed: parseInt($("seed").value || "0", 10) };
}

// ---- classify and generate ------------------------------------------------------------------------------------

function schedule(delay = 250) {
  clearTimeout(timer);
  timer = setTimeout(update, delay);
}

function showProbs(labels, result) {
  $("probs").tBodies[0].replaceChildren(...labels.map((label) => {
    const p = result.scores[label];
    return el("tr", { "data-label": label, "data-p": String(p) }, el("td", {}, label),
      el("td", { class: "bar-cell" }, el("div", { class: "bar", style: `width: ${(100 * p).toFixed(1)}%` })),
      el("td", { class: "p" }, p.toFixed(4)));
  }));
}

async function update() {
  const text = $("text").value;
  if (!text.trim() || (!$("composition").value && !document.querySelector(".term"))) return;
  const mine = ++sent;
  const base = { inputs: [text], composition: composition() };
  if ($("task").value) base.task = $("task").value;
  const labels = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  const classify = labels.length ? { ...base, labels } : base;
  const generate = { ...base, max_new_tokens: parseInt($("max-new").value || "8", 10) };
  $("request").textContent = JSON.stringify({ "/v1/classify": classify, "/v1/generate": generate }, null, 1);
  status("asking the model...");
  const [scored, generated] = await Promise.allSettled([
    classify.task || classify.labels ? api("POST", "v1/classify", classify) : Promise.reject(new Error("pick a task or give labels")),
    api("POST", "v1/generate", generate),
  ]);
  if (mine !== sent) return;
  const errors = [];
  if (scored.status === "fulfilled") showProbs(scored.value.labels, scored.value.results[0]);
  else { $("probs").tBodies[0].replaceChildren(); errors.push(`classify: ${scored.reason.message}`); }
  if (generated.status === "fulfilled") $("generation").textContent = generated.value.results[0].text;
  else { $("generation").textContent = ""; errors.push(`generate: ${generated.reason.message}`); }
  $("probs").dataset.request = JSON.stringify(classify); // which request the numbers shown belong to
  $("generation").dataset.request = JSON.stringify(generate);
  status(errors.length ? errors.join(" | ") : "ready", errors.length > 0);
}

// ---- wiring ---------------------------------------------------------------------------------------------------

$("key").value = sessionStorage.getItem(KEY_SLOT) || "";
$("use-key").addEventListener("click", () => {
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY_SLOT, key); else sessionStorage.removeItem(KEY_SLOT);
  loadStore();
});
$("add-term").addEventListener("click", () => { addTerm(); schedule(); });
for (const id of ["text", "labels", "seed", "max-new"]) $(id).addEventListener("input", () => schedule());
for (const id of ["task", "composition"]) $(id).addEventListener("change", () => schedule(0));
loadStore();
