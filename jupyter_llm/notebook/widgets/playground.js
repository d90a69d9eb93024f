// The sampling playground's view (anywidget ES module; no build step, no imports).
// Controls are traitlets synced with Python; output arrives as custom messages
// (see generation.py for their shape) and is rebuilt from a replay when a view opens.

// [trait, label, min, max, step, slider?]
const NUMBERS = [
  ["temperature", "temperature", 0, 2, 0.05, true],
  ["top_p", "top-p", 0, 1, 0.01, true],
  ["top_k", "top-k", 0, 1000, 1, false],
  ["min_p", "min-p", 0, 1, 0.01, true],
  ["repetition_penalty", "repetition penalty", 0.5, 2, 0.05, true],
  ["presence_penalty", "presence penalty", -2, 2, 0.1, true],
  ["frequency_penalty", "frequency penalty", -2, 2, 0.1, true],
  ["max_tokens", "max tokens", 1, 8192, 1, false],
  ["n", "samples", 1, 16, 1, false],
  ["logprobs", "alternatives", 0, 20, 1, false],
];

// Sent with "generate" (SETTINGS in playground.py): ipywidgets holds state updates back while one
// is unanswered, and a custom message would overtake them (a prompt typed just before Ctrl+Enter).
const SETTINGS = ["prompt", "chat", "system", "backend", "compare", "max_tokens", "temperature", "top_p",
  "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "seed_locked",
  "stop_strings", "n", "logprobs", "ignore_eos"];

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value);
  }
  el.append(...children.filter((c) => c !== null && c !== undefined));
  return el;
}

// Whitespace made visible in the alternatives list.
function visible(text) {
  if (text === "") return "∅";
  return text.replace(/ /g, "␣").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
}

// Red (unlikely) through yellow to green (likely).
function colour(p) {
  return `hsla(${Math.round(120 * p)}, 75%, 45%, 0.30)`;
}

const percent = (p) => `${(100 * p).toFixed(1)}%`;

function footer(finish) {
  const parts = [];
  if (finish.ttft !== null && finish.ttft !== undefined) parts.push(`TTFT ${(finish.ttft * 1000).toFixed(0)} ms`);
  if (finish.tps) parts.push(`${finish.tps.toFixed(1)} tok/s`);
  parts.push(`${finish.tokens} tokens`);
  parts.push(`finish: ${finish.reason}`);
  return parts.join(" · ");
}

// A number control: a number box (and a slider) bound to one trait. Values that do not
// parse stay local and marked invalid; Python validates the ranges.
function numberControl(model, [name, label, min, max, step, slider]) {
  const box = h("input", { type: "number", step: String(step), class: "jllm-number", "aria-label": label });
  const range = slider ? h("input", { type: "range", min: String(min), max: String(max), step: String(step),
                                       tabindex: "-1", "aria-hidden": "true" }) : null;
  const integer = Number.isInteger(step);
  const show = () => {
    const value = model.get(name);
    if (Number(box.value) !== value || box.value === "") box.value = String(value);
    if (range) range.value = String(value);
    box.classList.remove("jllm-invalid");
  };
  const set = (text) => {
    const value = Number(text);
    const ok = text.trim() !== "" && Number.isFinite(value) && (!integer || Number.isInteger(value));
    box.classList.toggle("jllm-invalid", !ok);
    if (!ok) return;
    model.set(name, value);
    model.save_changes();
  };
  box.addEventListener("input", () => { set(box.value); if (range) range.value = box.value; });
  if (range) range.addEventListener("input", () => { box.value = range.value; set(range.value); });
  model.on(`change:${name}`, show);
  show();
  return h("label", { class: `jllm-control jllm-${name}` }, h("span", {}, label), range, box);
}

function backendPicker(model, name, label, noneLabel) {
  const select = h("select", { class: `jllm-${name}`, "aria-label": label });
  const show = () => {
    const names = [...model.get("backends")];
    const current = model.get(name);
    if (current && !names.includes(current)) names.push(current);
    select.replaceChildren(
      ...(noneLabel ? [h("option", { value: "" }, noneLabel)] : []),
      ...names.map((n) => h("option", { value: n }, model.get("backends").includes(n) ? n : `${n} (not loaded)`)));
    if (!noneLabel && names.length === 0) select.append(h("option", { value: "" }, "no backend loaded"));
    select.value = current;
  };
  select.addEventListener("change", () => { model.set(name, select.value); model.save_changes(); });
  model.on(`change:${name}`, show);
  model.on("change:backends", show);
  show();
  return h("label", { class: "jllm-picker" }, h("span", {}, label), select);
}

function stopStrings(model) {
  const chips = h("span", { class: "jllm-chips" });
  const input = h("input", { type: "text", class: "jllm-stop-input", placeholder: "add, Enter (\\n = newline)" });
  const show = () => {
    chips.replaceChildren(...model.get("stop_strings").map((s, i) =>
      h("span", { class: "jllm-chip" }, visible(s),
        h("button", { class: "jllm-chip-x", title: "remove", onclick: () => {
          const list = [...model.get("stop_strings")];
          list.splice(i, 1);
          model.set("stop_strings", list);
          model.save_changes();
        } }, "×"))));
  };
  input.addEventListener("keydown", (event) => {
    if (event.key !== "Enter" || !input.value) return;
    event.preventDefault();
    const text = input.value.replace(/\\n/g, "\n").replace(/\\t/g, "\t");
    model.set("stop_strings", [...model.get("stop_strings"), text]);
    model.save_changes();
    input.value = "";
  });
  model.on("change:stop_strings", show);
  show();
  return h("label", { class: "jllm-control jllm-stop" }, h("span", {}, "stop strings"), chips, input);
}

// A padlock drawn inline (emoji fonts are missing on some systems), open when unlocked.
function padlock(locked) {
  const shackle = locked ? "M5 7V5a3 3 0 0 1 6 0v2" : "M5 7V5a3 3 0 0 1 6 0";
  return `<svg viewBox="0 0 16 16" width="14" height="14" aria-hidden="true">` +
    `<rect x="3" y="7" width="10" height="8" rx="1.5" fill="currentColor"/>` +
    `<path d="${shackle}" fill="none" stroke="currentColor" stroke-width="1.6"/></svg>`;
}

function seedControl(model) {
  const box = h("input", { type: "number", step: "1", class: "jllm-number jllm-seed-box", "aria-label": "seed" });
  const lock = h("button", { class: "jllm-lock", type: "button", "aria-label": "lock the seed" });
  const show = () => {
    box.value = String(model.get("seed"));
    const locked = model.get("seed_locked");
    lock.innerHTML = padlock(locked);
    lock.setAttribute("aria-pressed", String(locked));
    lock.title = locked ? "seed locked: the same settings give the same text" : "a new seed each time: lock to reproduce";
    lock.classList.toggle("jllm-locked", locked);
  };
  box.addEventListener("input", () => {
    const value = Number(box.value);
    const ok = box.value.trim() !== "" && Number.isInteger(value);
    box.classList.toggle("jllm-invalid", !ok);
    if (!ok) return;
    model.set("seed", value);
    model.set("seed_locked", true);  // typing a seed means: use it
    model.save_changes();
  });
  lock.addEventListener("click", () => { model.set("seed_locked", !model.get("seed_locked")); model.save_changes(); });
  model.on("change:seed", show);
  model.on("change:seed_locked", show);
  show();
  return h("label", { class: "jllm-control jllm-seed" }, h("span", {}, "seed"), box, lock);
}

function checkbox(model, name, label) {
  const box = h("input", { type: "checkbox", class: `jllm-${name}` });
  const show = () => { box.checked = model.get(name); };
  box.addEventListener("change", () => { model.set(name, box.checked); model.save_changes(); });
  model.on(`change:${name}`, show);
  show();
  return h("label", { class: "jllm-check" }, box, label);
}

function textInput(model, name, attrs, multiline) {
  const el = h(multiline ? "textarea" : "input", attrs);
  const show = () => { if (el.value !== model.get(name)) el.value = model.get(name); };
  el.addEventListener("input", () => { model.set(name, el.value); model.save_changes(); });
  model.on(`change:${name}`, show);
  show();
  return el;
}

// The hover card: each token of a segment with its probability and top alternatives.
function tipContent(tokens) {
  return tokens.map((tok) => h("div", { class: "jllm-tip-token" },
    h("div", { class: "jllm-tip-head" }, h("code", {}, visible(tok.t)), ` ${percent(tok.p)}`,
      h("span", { class: "jllm-tip-lp" }, ` logprob ${Math.log(Math.max(tok.p, 1e-12)).toFixed(2)}`)),
    ...tok.alt.map(([text, p]) => h("div", { class: `jllm-alt${text === tok.t ? " jllm-alt-chosen" : ""}` },
      h("code", {}, visible(text)),
      h("span", { class: "jllm-bar" }, h("span", { style: `width:${(100 * p).toFixed(1)}%` })),
      h("span", { class: "jllm-alt-p" }, percent(p))))));
}

function render({ model, el }) {
  const generate = () => model.send({ type: "generate",
    settings: Object.fromEntries(SETTINGS.map((name) => [name, model.get(name)])) });
  const onKey = (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      event.stopPropagation();
      generate();
    }
  };
  const prompt = textInput(model, "prompt", { class: "jllm-prompt", rows: "4", spellcheck: "false",
    placeholder: "Prompt… (Ctrl+Enter or ⌘+Enter to generate)", onkeydown: onKey }, true);
  const system = textInput(model, "system", { type: "text", class: "jllm-system",
    placeholder: "system prompt (chat mode)", onkeydown: onKey }, false);
  const generateButton = h("button", { class: "jllm-generate", type: "button", onclick: generate }, "Generate");
  const stopButton = h("button", { class: "jllm-stopbutton", type: "button",
    onclick: () => model.send({ type: "stop" }) }, "Stop");
  const status = h("span", { class: "jllm-status" });
  const errorText = h("span", {});
  const errorBox = h("div", { class: "jllm-error", role: "alert" }, errorText,
    h("button", { class: "jllm-error-x", type: "button", title: "dismiss",
      onclick: () => { model.set("error", ""); model.save_changes(); } }, "×"));
  const columns = h("div", { class: "jllm-columns" });
  const tip = h("div", { class: "jllm-tip", role: "tooltip" });

  const root = h("div", { class: "jllm-playground", "data-lm-suppress-shortcuts": "true" },
    h("div", { class: "jllm-row" },
      backendPicker(model, "backend", "backend", null),
      backendPicker(model, "compare", "compare with", "— none —"),
      checkbox(model, "chat", "chat"), system),
    prompt,
    h("div", { class: "jllm-grid" }, ...NUMBERS.map((spec) => numberControl(model, spec)),
      seedControl(model), stopStrings(model), checkbox(model, "ignore_eos", "ignore EOS")),
    h("div", { class: "jllm-row jllm-actions" }, generateButton, stopButton, status,
      h("span", { class: "jllm-legend" }, "probability ", h("span", { class: "jllm-scale" }), " 0 → 100%")),
    errorBox, columns, tip);
  el.append(root);

  const showChat = () => { system.disabled = !model.get("chat"); };
  const showRunning = () => {
    const running = model.get("running");
    generateButton.disabled = running;
    stopButton.disabled = !running;
    root.classList.toggle("jllm-running", running);
  };
  const showError = () => {
    errorText.textContent = model.get("error");
    errorBox.classList.toggle("jllm-hidden", !model.get("error"));
  };
  model.on("change:chat", showChat);
  model.on("change:running", showRunning);
  model.on("change:error", showError);
  showChat(); showRunning(); showError();

  // --- output ---------------------------------------------------------------------
  let run = null;  // {id, cols: [{text, foot, tokens}], ended}
  const updateStatus = () => {
    if (!run) { status.textContent = ""; return; }
    const tokens = run.cols.reduce((sum, c) => sum + c.tokens, 0);
    status.textContent = run.ended ? `done: ${tokens} tokens` : `generating… ${tokens} tokens`;
  };
  const start = (message) => {
    hideTip(true);
    run = { id: message.run, ended: false, cols: [] };
    columns.replaceChildren(...message.columns.map((c) => {
      const col = { text: h("div", { class: "jllm-text" }), foot: h("div", { class: "jllm-foot" }, "…"), tokens: 0 };
      run.cols.push(col);
      const label = message.columns.length > 1 ? `${c.backend} · sample ${c.sample + 1}` : c.backend;
      return h("div", { class: "jllm-col" }, h("div", { class: "jllm-col-head", title: c.model }, label,
        h("span", { class: "jllm-model" }, c.model)), col.text, col.foot);
    }));
    updateStatus();
  };
  const addItems = (items) => {
    for (const item of items) {
      const col = run.cols[item.c];
      if (item.finish) {
        col.tokens = item.finish.tokens;
        col.foot.textContent = footer(item.finish);
        col.foot.classList.toggle("jllm-foot-error", item.finish.reason === "error");
        if (item.finish.error) col.foot.title = item.finish.error;
        continue;
      }
      const span = h("span", { class: "jllm-tok" }, item.t === "" ? "∎" : item.t);
      if (item.t === "") span.classList.add("jllm-end");
      if (item.p.length) {
        span.style.background = colour(Math.min(...item.p.map((tok) => tok.p)));
        span.tokens = item.p;
      }
      col.tokens += item.k;
      col.text.append(span);
      col.foot.textContent = `${col.tokens} tokens…`;
    }
    updateStatus();
  };
  const onMessage = (message) => {
    if (message.type === "start") start(message);
    else if (!run || message.run !== run.id) return;  // a stale run's message
    else if (message.type === "tokens") addItems(message.items);
    else if (message.type === "end") { run.ended = true; updateStatus(); }
  };
  model.on("msg:custom", onMessage);

  // --- hover / click card ---------------------------------------------------------
  let pinned = null;
  const showTip = (span) => {
    if (!span.tokens) return;
    tip.replaceChildren(...tipContent(span.tokens));
    tip.classList.add("jllm-tip-open");
    const box = span.getBoundingClientRect();
    const outer = root.getBoundingClientRect();
    const left = Math.min(box.left - outer.left, Math.max(0, outer.width - tip.offsetWidth - 4));
    tip.style.left = `${Math.max(0, left)}px`;
    // Below the token when it fits inside the widget (outputs may clip), else above it.
    const below = outer.bottom - box.bottom >= tip.offsetHeight + 8;
    tip.style.top = `${below ? box.bottom - outer.top + 4 : box.top - outer.top - tip.offsetHeight - 4}px`;
  };
  function hideTip(force) {
    if (pinned && !force) return;
    if (pinned) pinned.classList.remove("jllm-pinned");
    pinned = null;
    tip.classList.remove("jllm-tip-open");
  }
  columns.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".jllm-tok");
    if (span && !pinned) showTip(span);
  });
  columns.addEventListener("mouseout", (event) => {
    if (event.target.closest(".jllm-tok")) hideTip(false);
  });
  columns.addEventListener("click", (event) => {  // click pins the card; click again unpins
    const span = event.target.closest(".jllm-tok");
    const same = span && span === pinned;
    hideTip(true);
    if (span && span.tokens && !same) {
      showTip(span);
      pinned = span;
      span.classList.add("jllm-pinned");
    }
  });

  // anywidget removes this view's model listeners when the view goes: no cleanup to return.
  model.send({ type: "hello" });  // Python answers with the backends and the current output
}

export default { render };
