// flaxlm ranking page. Model output only ever reaches the page through textContent,
// never as HTML. The ranking is a list of rows ("tiers"), best first; responses in one
// row tie. ranking[k] sent to the server is the row index of response k.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  item: null, tiers: [], pool: [], focus: null, tieNext: false, busy: false, progress: null,
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function labeler() { return $("labeler").value.trim(); }

function say(text, isError) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  let data;
  try { data = await response.json(); } catch (e) { data = { error: `server answered ${response.status}` }; }
  if (!response.ok) throw Object.assign(new Error(data.error || `error ${response.status}`), { status: response.status });
  return data;
}

// ------------------------------------------------------------------ rendering

function card(k) {
  const text = state.item.responses[k];
  const c = el("div", "card");
  c.tabIndex = 0;
  c.dataset.r = String(k);
  c.append(el("span", "num", String(k + 1)));
  c.append(text === "" ? el("pre", "text empty", "(empty response)") : el("pre", "text", text));
  c.addEventListener("focus", () => { state.focus = k; });
  c.addEventListener("pointerdown", startDrag);
  return c;
}

function gap(index) {
  const g = el("li", "gap");
  g.dataset.gap = String(index);
  g.title = "drop here for a new rank";
  return g;
}

function render() {
  const tiers = $("tiers"), pool = $("pool");
  tiers.replaceChildren();
  pool.replaceChildren();
  const has = state.item !== null;
  $("work").classList.toggle("finished", !has);
  for (const id of ["prompt-box", "ranking-box", "pool-box", "actions"]) $(id).hidden = !has;
  if (!has) return;
  $("prompt").textContent = state.item.prompt;
  state.tiers.forEach((tier, i) => {
    tiers.append(gap(i));
    const row = el("li", "tier");
    row.dataset.tier = String(i);
    row.append(el("span", "rankno", `#${i + 1}`));
    tier.forEach((k) => row.append(card(k)));
    tiers.append(row);
  });
  tiers.append(gap(state.tiers.length));
  state.pool.forEach((k) => pool.append(card(k)));
  if (state.focus !== null) {
    const f = document.querySelector(`.card[data-r="${state.focus}"]`);
    if (f) f.focus();
  }
}

function showProgress(p) {
  state.progress = p;
  const answered = p.ranked + p.skipped;
  const at = state.item ? `prompt ${answered + 1} of ${p.total}` : `all ${p.total} answered`;
  $("progress").textContent = `${at} · ${p.ranked} ranked, ${p.skipped} skipped`;
}

function setItem(data, ranking) {
  state.item = data.item;
  state.focus = null;
  state.tieNext = false;
  state.tiers = [];
  state.pool = [];
  if (state.item) {
    const k = state.item.responses.length;
    if (ranking) {
      for (let r = 0; r <= Math.max(...ranking); r++) state.tiers.push([]);
      ranking.forEach((rank, i) => state.tiers[rank].push(i));
    } else {
      for (let i = 0; i < k; i++) state.pool.push(i);
    }
  }
  $("done").hidden = state.item !== null;
  $("done").textContent = state.item ? "" :
    `Every prompt has your answer. ${data.progress.remaining_for_anyone} still unanswered by anyone.`;
  showProgress(data.progress);
  render();
}

// ------------------------------------------------------------------ ranking edits

function locate(k) {
  const t = state.tiers.findIndex((tier) => tier.includes(k));
  return t;  // -1: in the pool
}

function detach(k) {
  const t = locate(k);
  if (t < 0) { state.pool = state.pool.filter((x) => x !== k); return; }
  state.tiers[t] = state.tiers[t].filter((x) => x !== k);
  if (state.tiers[t].length === 0) state.tiers.splice(t, 1);
}

function place(k, tie) {
  detach(k);
  if (tie && state.tiers.length) state.tiers[state.tiers.length - 1].push(k);
  else state.tiers.push([k]);
  state.focus = k;
}

function unrank(k) {
  detach(k);
  state.pool.push(k);
  state.pool.sort((a, b) => a - b);
  state.focus = k;
}

// One step up: leave a tie to sit just above it, or join the row above if alone.
function moveUp(k) {
  const t = locate(k);
  if (t < 0) return place(k, false);
  if (state.tiers[t].length > 1) {
    state.tiers[t] = state.tiers[t].filter((x) => x !== k);
    state.tiers.splice(t, 0, [k]);
  } else if (t > 0) {
    state.tiers.splice(t, 1);
    state.tiers[t - 1].push(k);
  }
}

function moveDown(k) {
  const t = locate(k);
  if (t < 0) return;
  if (state.tiers[t].length > 1) {
    state.tiers[t] = state.tiers[t].filter((x) => x !== k);
    state.tiers.splice(t + 1, 0, [k]);
  } else if (t < state.tiers.length - 1) {
    state.tiers.splice(t, 1);
    state.tiers[t].push(k);
  }
}

function visualOrder() {
  return [...state.tiers.flat(), ...state.pool];
}

// ------------------------------------------------------------------ drag and drop
// Pointer events rather than HTML5 drag-and-drop: they work with mouse, pen and touch,
// and with the input that browser automation sends.

let drag = null;

function startDrag(event) {
  if (event.button !== 0) return;
  const c = event.currentTarget;
  drag = { k: Number(c.dataset.r), x: event.clientX, y: event.clientY, moved: false, card: c };
  event.preventDefault();
  c.focus();
}

function dropTargetAt(x, y) {
  for (const e of document.elementsFromPoint(x, y)) {
    if (drag && drag.card.contains(e)) continue;
    const target = e.closest(".gap, .tier, #pool");
    if (target) return target;
  }
  return null;
}

function markTarget(target) {
  document.querySelectorAll(".drop-target").forEach((e) => e.classList.remove("drop-target"));
  if (target) target.classList.add("drop-target");
}

document.addEventListener("pointermove", (event) => {
  if (!drag) return;
  if (!drag.moved && Math.hypot(event.clientX - drag.x, event.clientY - drag.y) < 4) return;
  drag.moved = true;
  document.body.classList.add("dragging");
  drag.card.classList.add("lifted");
  markTarget(dropTargetAt(event.clientX, event.clientY));
});

document.addEventListener("pointerup", (event) => {
  if (!drag) return;
  const { k, moved } = drag;
  const target = moved ? dropTargetAt(event.clientX, event.clientY) : null;
  drag = null;
  document.body.classList.remove("dragging");
  markTarget(null);
  if (!target) { render(); return; }
  if (target.id === "pool") unrank(k);
  else if (target.classList.contains("tier")) {
    const row = state.tiers[Number(target.dataset.tier)];
    if (!row.includes(k)) { detach(k); state.tiers[state.tiers.indexOf(row)].push(k); }
  } else {
    const before = state.tiers[Number(target.dataset.gap)];  // undefined: after the last row
    detach(k);
    const at = before ? state.tiers.indexOf(before) : state.tiers.length;
    state.tiers.splice(at < 0 ? state.tiers.length : at, 0, [k]);
  }
  state.focus = k;
  render();
});

// ------------------------------------------------------------------ answers

async function loadNext() {
  if (!labeler()) { say("Type your labeler name first.", true); return; }
  try { setItem(await api(`api/next?labeler=${encodeURIComponent(labeler())}`)); }
  catch (e) { say(e.message, true); }
  if (!$("history").hidden) await loadHistory();
}

async function send(action, extra) {
  if (state.busy) return;
  state.busy = true;
  try {
    const data = await api(`api/${action}`, { labeler: labeler(), ...extra });
    setItem(data, data.restored_ranking);
    say(action === "undo" ? "Your last answer was undone; answer it again." :
      action === "skip" ? "Skipped." : "Saved.");
    if (!$("history").hidden) await loadHistory();
  } catch (e) {
    say(e.message, true);
    if (e.status === 409 && action !== "undo") await loadNext();
  } finally {
    state.busy = false;
  }
}

function submit() {
  if (!state.item) return;
  if (state.pool.length) {
    say(`Place every response first (${state.pool.length} not ranked yet).`, true);
    return;
  }
  const ranking = new Array(state.item.responses.length);
  state.tiers.forEach((tier, i) => tier.forEach((k) => { ranking[k] = i; }));
  send("rank", { id: state.item.id, ranking });
}

function skip() { if (state.item) send("skip", { id: state.item.id }); }

async function loadHistory() {
  const list = $("history-list");
  try {
    const data = await api(`api/history?labeler=${encodeURIComponent(labeler())}`);
    list.replaceChildren();
    for (const h of data.history) {
      const li = el("li");
      li.append(el("div", "when", `${h.time} · ${h.ranking ? "ranked" : "skipped"}`));
      li.append(el("pre", "prompt", h.prompt));
      if (h.ranking) {
        const ol = el("ol");
        const order = h.responses.map((r, k) => k).sort((a, b) => h.ranking[a] - h.ranking[b]);
        for (const k of order) {
          const item = el("li");
          item.value = h.ranking[k] + 1;
          item.append(el("pre", "", h.responses[k] === "" ? "(empty response)" : h.responses[k]));
          ol.append(item);
        }
        li.append(ol);
      }
      list.append(li);
    }
    if (!data.history.length) list.append(el("li", "", "No answers yet."));
  } catch (e) { say(e.message, true); }
}

function toggleHistory() {
  $("history").hidden = !$("history").hidden;
  if (!$("history").hidden) loadHistory();
}

// ------------------------------------------------------------------ keys

document.addEventListener("keydown", (event) => {
  if (event.target === $("labeler") || event.ctrlKey || event.metaKey) return;
  const key = event.key;
  const n = state.item ? state.item.responses.length : 0;
  let handled = true;
  if (/^[1-9]$/.test(key) && Number(key) <= n) {
    place(Number(key) - 1, state.tieNext);
    state.tieNext = false;
    render();
  } else if (key === "=") {
    state.tieNext = true;
    say("Tie: the next number joins the last row.");
  } else if ((key === "ArrowUp" || key === "ArrowDown") && state.focus !== null && event.shiftKey) {
    (key === "ArrowUp" ? moveUp : moveDown)(state.focus);
    render();
  } else if (key === "ArrowUp" || key === "ArrowDown") {
    const order = visualOrder();
    const at = order.indexOf(state.focus);
    const next = at < 0 ? 0 : Math.max(0, Math.min(order.length - 1, at + (key === "ArrowUp" ? -1 : 1)));
    state.focus = order[next] ?? null;
    render();
  } else if ((key === "Backspace" || key === "Delete") && state.focus !== null) {
    unrank(state.focus);
    render();
  } else if (key === "Enter") submit();
  else if (key === "s" || key === "S") skip();
  else if (key === "u" || key === "U") send("undo", {});
  else if (key === "c" || key === "C") setItem({ item: state.item, progress: state.progress });
  else if (key === "h" || key === "H") toggleHistory();
  else handled = false;
  if (handled) event.preventDefault();
});

// ------------------------------------------------------------------ start

async function start() {
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("clear").addEventListener("click", () => setItem({ item: state.item, progress: state.progress }));
  $("undo").addEventListener("click", () => send("undo", {}));
  $("toggle-history").addEventListener("click", toggleHistory);
  $("labeler").addEventListener("change", () => {
    localStorage.setItem("flaxlm-labeler", labeler());
    loadNext();
  });
  let name = localStorage.getItem("flaxlm-labeler");
  if (!name) {
    try { name = (await api("api/config")).default_labeler; } catch (e) { name = ""; }
  }
  $("labeler").value = name || "";
  await loadNext();
}

start();
