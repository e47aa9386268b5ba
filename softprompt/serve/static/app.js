// The softprompt server's page: lists the loaded tasks and lets one try each of them.
// Plain DOM code, no framework and nothing fetched from outside this server.
"use strict";

(() => {
  const TOKEN_KEY = "softprompt.token";
  const $ = (selector, root = document) => root.querySelector(selector);

  // Metric names as people write them; `percent`: the value is a 0-1 fraction shown as a percentage,
  // `unit`: the value is already on a 0-100 scale.
  const METRICS = {
    accuracy: { title: "Accuracy", percent: true },
    macro_f1: { title: "Macro F1", percent: true },
    bleu: { title: "BLEU" },
    chrf: { title: "chrF" },
    rouge_l: { title: "ROUGE-L" },
    exact_match: { title: "Exact match", unit: "%" },
    f1: { title: "F1" },
    parse_rate: { title: "Parses", unit: "%" },
    pass_rate: { title: "Passes tests", unit: "%" },
  };

  const objectUrls = []; // figure blobs of the current listing, released on the next one

  // -- small helpers ------------------------------------------------------------------------------
  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function token() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  function storeToken(value) {
    try {
      if (value) localStorage.setItem(TOKEN_KEY, value);
      else localStorage.removeItem(TOKEN_KEY);
    } catch {
      /* storage may be disabled: the token then lives until the page is left */
    }
    memoryToken = value;
  }

  let memoryToken = token();

  /** fetch() against this server, with the bearer token when one is set. */
  function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (memoryToken) headers.set("Authorization", `Bearer ${memoryToken}`);
    if (options.json !== undefined) {
      headers.set("Content-Type", "application/json");
      options = { ...options, body: JSON.stringify(options.json) };
    }
    return fetch(path, { ...options, headers });
  }

  /** The message of an error reply ({"error": {"message"}}), or the best text there is. */
  async function errorMessage(response) {
    const text = await response.text().catch(() => "");
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
      if (body && body.detail) return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch {
      /* not JSON */
    }
    return `${response.status} ${response.statusText || ""}`.trim() + (text ? `: ${text.slice(0, 300)}` : "");
  }

  function formatBytes(n) {
    if (typeof n !== "number") return "–";
    if (n < 1024) return `${n} B`;
    if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
    return `${(n / 1024 / 1024).toFixed(1)} MiB`;
  }

  function formatMetric(key, value) {
    const spec = METRICS[key] || {};
    if (spec.percent) return `${(value * 100).toFixed(1)}%`;
    const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 1 ? 1 : 3;
    return `${value.toFixed(digits)}${spec.unit || ""}`;
  }

  function showNotice(message, kind = "info") {
    const notice = $("#notice");
    notice.replaceChildren();
    if (!message) {
      notice.hidden = true;
      return;
    }
    notice.className = `notice notice-${kind}`;
    notice.dataset.kind = kind;
    notice.append(...(Array.isArray(message) ? message : [message]));
    notice.hidden = false;
  }

  function setError(box, message) {
    box.textContent = message || "";
    box.hidden = !message;
  }

  // -- the listing --------------------------------------------------------------------------------
  let loading = 0; // the latest listing wins when several are under way

  async function loadTasks() {
    const ticket = ++loading;
    const list = $("#tasks");
    $("#summary").textContent = "Loading tasks…";
    let response;
    let body = null;
    try {
      response = await api("/v1/tasks");
      if (response.ok) body = await response.json();
    } catch (err) {
      if (ticket !== loading) return;
      $("#summary").textContent = "";
      showNotice(`Cannot reach the server: ${err.message}`, "error");
      return;
    }
    if (ticket !== loading) return;
    if (response.status === 401) {
      clearListing(list);
      $("#model").textContent = "token required";
      $("#summary").textContent = "";
      const ask = memoryToken
        ? "The server refused this token. Enter the right one above and press Save."
        : "This server needs an API token. Enter it above and press Save.";
      showNotice(ask, "auth");
      $("#token").focus();
      return;
    }
    if (!response.ok) {
      clearListing(list);
      $("#summary").textContent = "";
      showNotice(`Could not list the tasks: ${await errorMessage(response)}`, "error");
      return;
    }
    showNotice(null);
    clearListing(list);
    $("#model").textContent = [body.model, body.fingerprint && `fingerprint ${body.fingerprint}`].filter(Boolean).join(" · ");
    const tasks = body.tasks || [];
    const kinds = tasks.reduce((acc, t) => ((acc[t.kind] = (acc[t.kind] || 0) + 1), acc), {});
    const parts = Object.entries(kinds).map(([kind, n]) => `${n} ${kind}`);
    $("#summary").textContent = tasks.length
      ? `${tasks.length} task${tasks.length === 1 ? "" : "s"} loaded (${parts.join(", ")})`
      : "";
    if (!tasks.length) {
      list.append(
        el("div", { class: "empty" },
          el("p", { text: "No task is loaded." }),
          el("p", {}, "Load one with ", el("code", { text: 'POST /v1/tasks {"name": …, "path": "runs/…"}' }),
            " or start the server with a run folder.")),
      );
      return;
    }
    for (const task of tasks) list.append(renderTask(task));
  }

  function clearListing(list) {
    while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
    list.replaceChildren();
  }

  function renderTask(task) {
    const generation = task.kind === "generation";
    const section = el("section", { class: "task", "data-task": task.name, "data-kind": task.kind, id: `task-${task.name}` });

    const header = el("header", { class: "task-head" },
      el("h2", { class: "task-name", text: task.name }),
      el("span", { class: `badge badge-${generation ? "gen" : "cls"}`, text: task.kind }),
      el("span", { class: "task-size", title: "prompt.safetensors on disk", text: formatBytes(task.size_bytes) }),
    );

    const info = el("div", { class: "task-info" },
      el("div", { class: "template-block" },
        el("span", { class: "caption", text: "Template" }),
        el("code", { class: "template", text: task.template || "" })),
      renderFacts(task),
      renderMetrics(task),
      renderFigures(task),
    );

    section.append(header, el("div", { class: "task-body" }, info, renderForm(task)));
    return section;
  }

  function renderFacts(task) {
    const facts = el("dl", { class: "facts" });
    const add = (term, value) => facts.append(el("div", { class: "fact" }, el("dt", { text: term }), el("dd", {}, value)));
    add("Soft tokens", String(task.soft_tokens));
    add("Max length", String(task.max_length));
    if (task.labels) {
      add(`Labels (${task.labels.length})`, el("span", { class: "chips" },
        task.labels.map((label) => el("span", { class: "chip", text: label }))));
    }
    if (task.generation) {
      for (const [key, value] of Object.entries(task.generation)) {
        if (value === null || value === undefined) continue;
        if (Array.isArray(value) && !value.length) continue;
        if (typeof value === "number" || typeof value === "boolean") {
          add(key.replaceAll("_", " "), String(value));
          continue;
        }
        // stop strings as JSON, so that "\n" shows; other lists as words
        const shown = Array.isArray(value) && key !== "stop" ? value.join(", ") : typeof value === "string" ? value : JSON.stringify(value);
        add(key.replaceAll("_", " "), el("code", { class: "value", text: shown }));
      }
    }
    return facts;
  }

  function renderMetrics(task) {
    const metrics = task.metrics || {};
    const dev = metrics.dev || {};
    const zero = metrics.dev_zero_shot || {};
    const keys = Object.keys(dev).filter((k) => k !== "n" && typeof dev[k] === "number");
    if (!keys.length) return el("p", { class: "muted no-metrics", text: "No dev metrics recorded for this run." });
    const tiles = keys.map((key) => el("div", { class: "metric", "data-metric": key },
      el("span", { class: "metric-name", text: (METRICS[key] || {}).title || key }),
      el("span", { class: "metric-value", text: formatMetric(key, dev[key]) }),
      typeof zero[key] === "number"
        ? el("span", { class: "metric-base", title: "the same model without the tuned prompt", text: `zero-shot ${formatMetric(key, zero[key])}` })
        : null,
    ));
    const notes = [];
    if (typeof dev.n === "number") notes.push(`${dev.n} dev rows`);
    if (typeof metrics.best_step === "number") {
      notes.push(`prompt of step ${metrics.best_step}${typeof metrics.steps === "number" ? ` of ${metrics.steps}` : ""}`);
    }
    return el("div", { class: "metrics-block" },
      el("span", { class: "caption", text: "Dev metrics" }),
      el("div", { class: "metrics", "data-role": "metrics" }, tiles),
      notes.length ? el("p", { class: "muted small", text: notes.join(" · ") }) : null);
  }

  function renderFigures(task) {
    const files = (task.files || []).filter((f) => /\.png$/i.test(f));
    if (!files.length) return null;
    const titles = { "learning_curve.png": "Learning curve", "confusion_matrix.png": "Confusion matrix" };
    const figures = el("div", { class: "figures" });
    for (const file of files) {
      const img = el("img", { alt: titles[file] || file, "data-file": file, loading: "eager" });
      const link = el("a", { class: "figure-link", title: "open full size", target: "_blank", rel: "noopener" }, img);
      const caption = el("figcaption", { text: titles[file] || file });
      const figure = el("figure", { class: "figure is-loading" }, link, caption);
      figures.append(figure);
      loadFigure(task.name, file, img, link, figure);
    }
    return figures;
  }

  async function loadFigure(name, file, img, link, figure) {
    try {
      const response = await api(`/v1/tasks/${encodeURIComponent(name)}/files/${encodeURIComponent(file)}`);
      if (!response.ok) throw new Error(await errorMessage(response));
      const url = URL.createObjectURL(await response.blob());
      objectUrls.push(url);
      img.src = url;
      link.href = url;
      figure.classList.remove("is-loading");
    } catch (err) {
      figure.classList.remove("is-loading");
      figure.classList.add("is-broken");
      figure.replaceChildren(el("figcaption", { class: "error-text", text: `${file}: ${err.message}` }));
    }
  }

  // -- trying a task --------------------------------------------------------------------------------
  function renderForm(task) {
    const generation = task.kind === "generation";
    const id = (suffix) => `${task.name}-${suffix}`.replace(/[^A-Za-z0-9_-]/g, "_");
    const form = el("form", { class: "try", "data-role": "form", novalidate: true });
    form.append(el("h3", { class: "try-title", text: "Try it" }));

    for (const field of task.fields || []) {
      form.append(el("label", { class: "field", for: id(`f-${field}`) },
        el("span", { class: "field-name", text: field }),
        el("textarea", {
          id: id(`f-${field}`), name: field, rows: 3, "data-field": field,
          placeholder: `{${field}}`, spellcheck: "false",
        })));
    }

    const submit = el("button", { type: "submit", class: "btn btn-primary", "data-role": "submit" },
      generation ? "Generate" : "Classify");
    const actions = el("div", { class: "actions" });
    let tokensInput = null;
    let stop = null;
    if (generation) {
      const initial = (task.generation && task.generation.max_new_tokens) || 64;
      tokensInput = el("input", {
        type: "number", min: 1, step: 1, value: initial, id: id("max-new"), name: "max_new_tokens",
        "data-role": "max-new-tokens", class: "num",
      });
      actions.append(el("label", { class: "inline", for: id("max-new") }, "max new tokens", tokensInput));
      stop = el("button", { type: "button", class: "btn btn-ghost", "data-role": "stop", hidden: true }, "Stop");
    }
    actions.append(el("span", { class: "spacer" }), el("span", { class: "hint", text: "Ctrl+Enter" }));
    if (stop) actions.append(stop);
    actions.append(submit);
    form.append(actions);

    const error = el("div", { class: "error", "data-role": "error", role: "alert", hidden: true });
    const result = el("div", { class: "result", "data-role": "result", hidden: true });
    form.append(error, result);

    form.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });

    let controller = null;
    if (stop) stop.addEventListener("click", () => controller && controller.abort());

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      if (submit.disabled) return;
      const row = {};
      for (const area of form.querySelectorAll("textarea[data-field]")) row[area.dataset.field] = area.value;
      setError(error, "");
      submit.disabled = true;
      form.classList.add("busy");
      const started = performance.now();
      try {
        if (generation) {
          const n = Number(tokensInput.value);
          if (!Number.isInteger(n) || n < 1) throw new Error("max new tokens must be a whole number of at least 1");
          controller = new AbortController();
          stop.hidden = false;
          await generate(task, row, n, result, error, controller.signal, started);
        } else {
          await classify(task, row, result, error, started);
        }
      } catch (err) {
        const output = result.querySelector('[data-role="output"]');
        const stopped = err.name === "AbortError";
        if (output && output.dataset.state !== "done") output.dataset.state = stopped ? "stopped" : "error";
        setError(error, stopped ? "Stopped before the answer was complete." : err.message || String(err));
      } finally {
        submit.disabled = false;
        form.classList.remove("busy");
        if (stop) stop.hidden = true;
        controller = null;
      }
    });
    return form;
  }

  function elapsed(started) {
    const ms = performance.now() - started;
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  async function classify(task, row, result, error, started) {
    const response = await api("/v1/classify", { method: "POST", json: { task: task.name, inputs: [row] } });
    if (!response.ok) {
      result.hidden = true;
      setError(error, await errorMessage(response));
      return;
    }
    const answer = (await response.json()).results[0];
    const ranked = Object.entries(answer.probabilities).sort((a, b) => b[1] - a[1]);
    const bars = ranked.map(([label, p]) => {
      const pct = (p * 100).toFixed(1);
      return el("div", {
        class: `bar${label === answer.label ? " is-top" : ""}`, "data-role": "bar", "data-label": label,
        "data-probability": p,
      },
        el("span", { class: "bar-label", text: label, title: label }),
        el("span", { class: "bar-track" }, el("span", { class: "bar-fill", style: `width: ${Math.max(0, Math.min(100, p * 100))}%` })),
        el("span", { class: "bar-pct", "data-role": "percent", text: `${pct}%` }));
    });
    const meta = [`${answer.prompt_tokens} prompt tokens`, elapsed(started)];
    result.replaceChildren(...[
      el("div", { class: "prediction" },
        el("span", { class: "caption", text: "Predicted" }),
        el("span", { class: "label", "data-role": "label", text: answer.label })),
      el("div", { class: "bars", "data-role": "bars" }, bars),
      cutNote(answer.cut, task),
      el("p", { class: "muted small meta", text: meta.join(" · ") }),
    ].filter(Boolean));
    result.hidden = false;
  }

  function cutNote(cut, task) {
    if (!cut) return null;
    return el("p", { class: "warn small", text: `The input was cut by ${cut} tokens to fit the run's max length (${task.max_length}).` });
  }

  /** POST /v1/generate with stream: the reply is server-sent events, read from the body as they come. */
  async function generate(task, row, maxNewTokens, result, error, signal, started) {
    const output = el("pre", { class: "output", "data-role": "output", "data-state": "waiting", "data-pieces": 0 });
    const meta = el("p", { class: "muted small meta", text: "waiting for the first token…" });
    result.replaceChildren(el("span", { class: "caption", text: "Output" }), output, meta);
    result.hidden = false;

    const response = await api("/v1/generate", {
      method: "POST",
      json: { task: task.name, inputs: [row], max_new_tokens: maxNewTokens, stream: true },
      signal,
    });
    if (!response.ok) {
      result.hidden = true;
      setError(error, await errorMessage(response));
      return;
    }
    output.dataset.state = "streaming";
    let pieces = 0;
    let finished = false;

    const handle = (data) => {
      if (data === "[DONE]") return;
      let event;
      try {
        event = JSON.parse(data);
      } catch {
        return; // not ours: ignore
      }
      if (event.error) {
        output.dataset.state = "error";
        setError(error, event.error.message || "the server failed to answer");
        finished = true;
      } else if (event.done) {
        const first = (event.results || [])[0] || {};
        output.textContent = first.text ?? output.textContent;
        output.dataset.state = "done";
        finished = true;
        const facts = [`${first.tokens ?? pieces} tokens`];
        if (first.finish_reason) facts.push(first.finish_reason === "length" ? "stopped at max new tokens" : "stopped");
        if (typeof first.prompt_tokens === "number") facts.push(`${first.prompt_tokens} prompt tokens`);
        facts.push(elapsed(started));
        meta.textContent = facts.join(" · ");
        const note = cutNote(first.cut, task);
        if (note) meta.before(note);
      } else if (typeof event.text === "string" && (event.index ?? 0) === 0) {
        output.append(event.text);
        pieces += 1;
        output.dataset.pieces = pieces;
        meta.textContent = `${pieces} pieces so far…`;
      }
    };

    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
      // events end at a blank line; a "\r" at the very end may be half of a "\r\n" still to come
      const held = !done && buffer.endsWith("\r");
      buffer = (held ? buffer.slice(0, -1) : buffer).replace(/\r\n?/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const data = eventData(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (data) handle(data);
      }
      if (held) buffer += "\r";
      if (done) break;
    }
    const last = eventData(buffer);
    if (last) handle(last);
    if (!finished) {
      output.dataset.state = "error";
      setError(error, "The stream ended before the answer was complete.");
    }
  }

  /** The data of one server-sent event (its `data:` lines joined); comments and other fields dropped. */
  function eventData(block) {
    return block.split("\n").filter((line) => line.startsWith("data:"))
      .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
  }

  // -- start ------------------------------------------------------------------------------------------
  function start() {
    const input = $("#token");
    input.value = memoryToken;
    $("#token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      storeToken(input.value.trim());
      loadTasks();
    });
    $("#token-clear").addEventListener("click", () => {
      input.value = "";
      storeToken("");
      loadTasks();
    });
    $("#reload").addEventListener("click", () => loadTasks());
    loadTasks();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
