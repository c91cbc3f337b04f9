// The turtle-reid page: identify photos, confirm matches, browse individuals, look at the similarity map.
// It uses nothing but the public API (documented at /docs), so anything it does a script can do too.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE_SIZE = 48;
const KEY_STORAGE = "turtle-reid-api-key";
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let health = null;

/** An element with attributes (on* become listeners) and children (strings become text, never HTML). */
function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function showMessage(text, kind = "error") {
  const box = $("message");
  box.textContent = text;
  box.className = `message ${kind}`;
  box.hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
}

// the banner stays in view while the user scrolls (it would cover what is under it): a click puts it away
$("message").addEventListener("click", clearMessage);

/** fetch with the API key; a refusal becomes an Error carrying the service's own message. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("X-API-Key", apiKey);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (error) {
    throw new Error(`the service cannot be reached (${error.message}); is reid serve still running?`);
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).message || message;
    } catch (_) { /* not a JSON error body: keep the status line */ }
    if (response.status === 401) {  // the service speaks of headers; a person needs to know where to type
      message = (/wrong/.test(message) ? "This API key is wrong" : "This service asks for its API key") +
        ": type it in the API key box at the top of the page.";
    }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

/** Show a photo served by the API (sent with the key, which an <img src> could not carry). */
function loadImage(img, path) {
  api(path)
    .then((response) => response.blob())
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.alt = "photo unavailable"; });
  return img;
}

function formatScore(value) {
  return value === null || value === undefined ? "" : value.toFixed(3);
}

const plural = (count, noun) => `${count} ${noun}${count === 1 ? "" : "s"}`;

/** The id typed in ``input``, trimmed (a pasted id often ends in a space), or null with a message saying what is
 *  wrong with it. The service checks it again; this only saves a round trip and says it in plain words. */
function typedId(input) {
  input.value = input.value.trim();
  if (!input.value) {
    showMessage("Type an id for the new individual first (letters, digits, _ . -).");
  } else if (!input.checkValidity()) {  // its pattern attribute, the same alphabet as the service's
    showMessage(`"${input.value}" cannot be an id: use letters, digits and _ . - only (no spaces or accents), up ` +
                "to 128 characters.");
  } else {
    return input.value;
  }
  input.focus();
  return null;
}

/** A field for the side of the head a photo shows (top, left, right...: suggested, not imposed, as in the API). */
function viewInput(label) {
  return el("input", { type: "text", className: "view", list: "views", placeholder: "view, e.g. left (optional)",
                       "aria-label": label, maxlength: 64 });
}

/** The form fields of photos to enrol: each file, and the views only when one was given (then one per file). */
function photoForm(files, views) {
  const form = new FormData();
  for (const file of files) form.append("files", file);
  if (views.some(Boolean)) for (const view of views) form.append("view", view);
  return form;
}

// room left in a request for the form's own bytes: its boundaries, and each part's headers and view
const FORM_BYTES = 16384;
const PART_BYTES = 1024;
// the service's multipart parser refuses a request of more than 1000 files, or 1000 other fields (each photo's view
// is one): half of that leaves room for the rest of the form
const MAX_FILES_PER_REQUEST = 500;

/** The photos in consecutive groups that each fit in one request under the service's body limit (/health's
 *  max_upload_bytes): six camera photos of 4 MB are one enrolment, not a refusal. Throws, before anything is sent,
 *  for a photo that alone is over the limit. */
function uploadGroups(files, views) {
  const limit = health && health.max_upload_bytes ? health.max_upload_bytes : Infinity;
  const groups = [];
  let group = null;
  files.forEach((file, i) => {
    const bytes = file.size + PART_BYTES;
    if (FORM_BYTES + bytes > limit) {
      throw new Error(`${file.name} (${megabytes(file.size)}) does not fit in one request to this service (at ` +
                      `most ${megabytes(limit)}, the form's own bytes included): send a smaller copy, or start ` +
                      "the service with a higher --max-upload-bytes");
    }
    if (!group || group.bytes + bytes > limit || group.files.length === MAX_FILES_PER_REQUEST) {
      groups.push(group = { files: [], views: [], bytes: FORM_BYTES });
    }
    group.files.push(file);
    group.views.push(views[i]);
    group.bytes += bytes;
  });
  return groups;
}

function megabytes(bytes) {
  return `${(bytes / 1048576).toFixed(2)} MB`;
}

/** Send photos of one individual in as many requests as the body limit needs: the first group to ``first`` (with
 *  its extra ``fields``), the others to ``rest``. Returns ``{images, unsent}``: every stored photo, as one answer
 *  would list them, and ``unsent`` (null when all were stored): the ``error`` of a request that failed after
 *  others were stored, with the ``files`` and ``views`` of that request and the ones after it. Throws when nothing
 *  was stored. */
async function sendPhotos(files, views, first, fields, rest) {
  const groups = uploadGroups(files, views);
  const images = [];
  for (const [number, group] of groups.entries()) {
    const form = photoForm(group.files, group.views);
    if (number === 0) for (const [name, value] of Object.entries(fields)) form.append(name, value);
    try {
      images.push(...(await (await api(number === 0 ? first : rest, { method: "POST", body: form })).json()).images);
    } catch (error) {
      if (!images.length) throw error;
      const later = groups.slice(number);
      return { images, unsent: { error, files: later.flatMap((g) => g.files), views: later.flatMap((g) => g.views) } };
    }
  }
  return { images, unsent: null };
}

/** Confirm photos saved to an individual by :func:`sendPhotos`, naming those it could not send (they wait, listed
 *  under the individual's "Add photos", to be sent again or left out), then refresh what depends on them. */
async function confirmSent(individualId, saved, sentence) {
  await showIndividual(individualId, saved.unsent);  // it clears the message: say what happened after it
  const text = savedPhotos(saved, sentence);
  showSaved(saved, saved.unsent ? `${text} ${unsentNote(saved.unsent)}` : text, saved.unsent ? "warn" : "ok");
  refreshHealth();
  identifyOthersAgain(savedNote(individualId));
}

/** The chosen photos listed with a view field each, and a button that sends them with ``send(files, views)``. */
function photoList(files, buttonLabel, send, views = []) {
  // a file chosen twice (same name, size and date) is listed once: stored once anyway, its second view would be lost
  const unique = [...new Map(files.map((file) => [`${file.name}|${file.size}|${file.lastModified}`, file])).values()];
  const twice = files.length - unique.length;
  let rows = unique.map((file) => ({ file, view: viewInput(`view of ${file.name}`) }));
  for (const row of rows) row.view.value = views[files.indexOf(row.file)] || "";
  const button = el("button", { type: "button" }, buttonLabel);
  button.addEventListener("click", async () => {
    if (!rows.length) {
      showMessage("Choose at least one photo.");
      return;
    }
    button.disabled = true;  // one upload at a time: a double click would enrol twice
    try {
      await send(rows.map((row) => row.file), rows.map((row) => row.view.value.trim()));
    } finally {
      button.disabled = false;
    }
  });
  // the service takes all the photos of a request or none: a file it refuses is taken out here, the others and
  // their views stay
  for (const row of rows) {
    row.node = el("li", {},
      el("img", { className: "thumb", alt: "", src: URL.createObjectURL(row.file) }),
      el("span", { className: "file-name" }, row.file.name), row.view,
      el("button", { type: "button", className: "secondary", "aria-label": `leave out ${row.file.name}`,
                     onclick: () => { rows = rows.filter((other) => other !== row); row.node.remove(); } },
        "Leave out"));
  }
  return el("div", { className: "photo-list" },
    twice ? el("p", { className: "muted" }, `${plural(twice, "photo")} chosen twice ${twice === 1 ? "is" : "are"} ` +
      "listed once.") : null,
    el("ul", {}, rows.map((row) => row.node)), button);
}

// -- status and API key ---------------------------------------------------------------------------------------

async function refreshHealth() {
  try {
    health = await (await api("/health")).json();
  } catch (error) {
    $("status").textContent = error.status === 401 ? error.message : `Service unavailable: ${error.message}`;
    return;
  }
  const matching = health.verification
    ? "the model's similarity, checked by matching points between the photos" : "the model's similarity";
  const threshold = health.threshold === null
    ? "no new-turtle threshold (every photo gets its closest individuals)"
    : `new turtle below a score of ${formatScore(health.threshold)}` +
      (health.runner_up_weight > 0 ? ` plus ${health.runner_up_weight} × the second individual's score` : "");
  $("status").textContent = `${plural(health.individuals, "individual")}, ${plural(health.photos, "photo")} · ` +
    `matching by ${matching} ` +
    `· ${threshold}`;
  $("key-hint").textContent = health.writes_protected
    ? "This service asks for a key to add or delete" + (health.reads_protected ? " and to look. " : ". ") +
      "Kept in this browser tab only, never stored by the service."
    : "This service needs no key. Kept in this browser tab only, never stored by the service.";
}

$("api-key").value = apiKey;
$("api-key").addEventListener("change", async (event) => {
  apiKey = event.target.value.trim();
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  clearMessage();
  await refreshHealth();
  // what the missing (or wrong) key stopped is asked again: the open list, and the photos it could not identify
  if (!$("panel-individuals").hidden) loadIndividuals(true);
  identifyOthersAgain("Identified with the API key:", (card) => card.dataset.locked === "true");
});
$("key-form").addEventListener("submit", (event) => event.preventDefault());

// -- tabs -----------------------------------------------------------------------------------------------------

const TABS = ["identify", "individuals", "similarity"];

function selectTab(name) {
  for (const tab of TABS) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`panel-${tab}`).hidden = tab !== name;
  }
  clearMessage();
  if (name === "individuals") loadIndividuals(true);
}

for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));

// -- identify -------------------------------------------------------------------------------------------------

const drop = $("drop");
$("identify-files").addEventListener("change", (event) => {
  identifyFiles([...event.target.files]);
  event.target.value = "";
});
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const files = [...event.dataTransfer.files];
  // the service decides what is a photo (an iPhone's HEIC has no image/ type in many browsers): only plain text and
  // the like are held back here, and the user is told
  const photos = files.filter((file) => !file.type || file.type.startsWith("image/"));
  identifyFiles(photos);
  const skipped = files.length - photos.length;
  if (skipped) showMessage(`${skipped} dropped file${skipped === 1 ? " is" : "s are"} not a photo and ${skipped === 1 ? "was" : "were"} skipped.`);
});

async function identifyFiles(files) {
  clearMessage();
  const cards = files.map((file) => {
    const card = el("article", { className: "card result", "data-filename": file.name },
      el("h2", {}, file.name), el("p", { className: "muted" }, "Identifying…"));
    card.fileToIdentify = file;  // a later change of the gallery identifies it again
    $("results").prepend(card);
    return [card, file];
  });
  for (const [card, file] of cards) await identifyInto(card, file); // one at a time: the service is often a laptop
}

/** Identify ``file`` and draw the answer in ``card``. ``stillWanted``: the card is asked again because the gallery
 *  changed, and the answer is drawn only if that round is still the latest when it arrives (answers come back out
 *  of order) and nobody is working on the card: a card being saved, typed in or showing its matching points keeps
 *  what it shows, with a button to identify it again when its user is ready. */
async function identifyInto(card, file, note = "", stillWanted = null) {
  const form = new FormData();
  form.append("file", file);
  form.append("k", "5");
  let answer;
  try {
    answer = await (await api("/identify", { method: "POST", body: form })).json();
  } catch (error) {
    if (stillWanted && !stillWanted()) return;
    card.dataset.locked = String(error.status === 401);
    if (stillWanted && card.querySelector("table")) {  // the service busy or gone a moment: the answer stays
      againNote(card, file, `Could not identify it again: ${error.message}`);
      return;
    }
    // a photo the service refuses (not a photo, too large...) would be refused again: it is not asked again
    if (error.status >= 400 && error.status < 500 && error.status !== 401) card.dataset.refused = "true";
    card.replaceChildren(el("h2", {}, file.name), el("p", { className: "message error" }, error.message));
    return;
  }
  if (stillWanted && (!stillWanted() || card.dataset.busy || card.dataset.saved)) return;
  card.dataset.locked = "false";
  if (stillWanted && (card.contains(document.activeElement) || card.querySelector(".explain img"))) {
    againNote(card, file, "The enrolled photos changed while you were working on this photo.");
    return;
  }
  const typed = [...card.querySelectorAll("input")].map((input) => input.value);  // a redraw keeps what was typed
  renderAnswer(card, file, answer, note);
  card.querySelectorAll("input").forEach((input, i) => { if (typed[i]) input.value = typed[i]; });
}

/** A line under the card's title that says why its answer may be out of date, with a button to ask again. */
function againNote(card, file, text) {
  card.querySelector(".again-note")?.remove();
  card.querySelector("h2").after(el("p", { className: "again-note muted" }, `${text} `,
    el("button", { type: "button", className: "secondary", onclick: () => identifyInto(card, file,
      "Identified again:") }, "Identify it again")));
}

function renderAnswer(card, file, answer, note) {
  const known = answer.predictions.filter((p) => p.individual_id !== "new_turtle");
  const best = known[0];
  // new_turtle's score is the bar an individual had to reach: the threshold, raised by the runner-up's share
  const bar = answer.predictions.find((p) => p.individual_id === "new_turtle");
  const needed = answer.runner_up_weight > 0
    ? `it needed ${formatScore(bar ? bar.score : answer.threshold)}: the threshold ` +
      `${formatScore(answer.threshold)} plus ${answer.runner_up_weight} × the next individual's score`
    : `the threshold is ${formatScore(answer.threshold)}`;
  const verdict = answer.new_turtle
    ? el("p", { className: "verdict new" }, "New turtle: no enrolled photo is similar enough",
        best ? ` (the closest, ${best.individual_id}, scores ${formatScore(best.score)}; ${needed})` : "")
    : best
      ? el("p", { className: "verdict match" }, `Best match: ${best.individual_id} (score ${formatScore(best.score)})`)
      : el("p", { className: "verdict new" }, "No individual is enrolled yet: enrol this one below.");
  const query = el("img", { alt: `query photo ${file.name}`, src: URL.createObjectURL(file) });
  const pair = el("div", { className: "pair" }, el("figure", {}, query, el("figcaption", {}, "Your photo")));
  if (best && best.evidence) {
    pair.append(el("figure", {},
      loadImage(el("img", { alt: `enrolled photo of ${best.individual_id}` }), `${best.evidence.url}?max_side=640`),
      el("figcaption", {}, `Best-matching enrolled photo of ${best.individual_id}` +
        (best.evidence.view ? ` (${best.evidence.view} view)` : ""))));
  }
  const explain = el("div", { className: "explain" });
  const verified = answer.predictions.some((p) => p.evidence && p.evidence.inliers !== null);
  const line = answer.predictions.findIndex((p) => p.individual_id === "new_turtle");
  const rows = answer.predictions.map((p, i) => predictionRow(card, file, p, i + 1, explain, verified,
                                                              line >= 0 && i > line));
  const titles = ["Rank", "Individual", "Score", "Matched photo", verified ? "Matching points" : null, ""];
  const table = el("table", {},
    el("thead", {}, el("tr", {}, titles.filter((t) => t !== null).map((title) => el("th", {}, title)))),
    el("tbody", {}, rows));
  const scroller = el("div", { className: "table-scroll" }, table);  // a phone scrolls the table, not the page
  const name = el("input", { type: "text", placeholder: "new individual's id, e.g. t-0421", "aria-label":
    "id of the new individual", pattern: "[A-Za-z0-9_.\\-]{1,128}", className: "new-id",
    title: "letters, digits and _ . - only (no spaces), up to 128" });
  const enrol = el("form", { className: "actions", novalidate: true, onsubmit: (event) => {
    event.preventDefault();
    const individualId = typedId(name);
    if (individualId) confirmMatch(card, file, individualId, true);
  } }, el("span", {}, "Not any of these?"), name, el("button", { type: "submit" }, "Enrol as a new individual"));
  const view = el("p", { className: "actions" }, el("span", {}, "This photo shows the"),
    viewInput(`view of ${file.name}`), el("span", { className: "muted" }, "side: saved with it when you save it"));
  card.replaceChildren(el("h2", {}, file.name), note ? el("p", { className: "muted" }, note) : "", verdict, pair,
    scroller, view, enrol, explain);
}

function predictionRow(card, file, prediction, rank, explain, verified, belowLine) {
  if (prediction.individual_id === "new_turtle") {
    return el("tr", { className: "new-turtle" }, el("td", {}, rank),
      el("td", { colspan: verified ? 5 : 4 }, `new turtle: every individual below here scores under ` +
        `${formatScore(prediction.score)}`));
  }
  const evidence = prediction.evidence;
  const width = Math.max(2, Math.round(Math.max(0, prediction.score) * 80));
  const thumb = evidence
    ? loadImage(el("img", { className: "thumb", alt: `matched photo of ${prediction.individual_id}` }),
                `${evidence.url}?max_side=128`)
    : "";
  // under verification's floor the matches are as many as chance gives two turtles: say so beside the number
  const points = evidence && evidence.inliers !== null && evidence.inliers !== undefined
    ? `${evidence.inliers}${evidence.inliers_counted === false ? " (too few to count)" : ""}` : "–";
  const actions = el("div", { className: "actions" });
  if (evidence) {
    actions.append(el("button", { className: "secondary", onclick: () => showMatches(explain, file, prediction) },
      "Show matching points"));
  }
  const add = () => {
    // under the new-turtle line the service would not have named it: one click must not file the photo there
    if (belowLine && !confirm(`${prediction.individual_id} scores ${formatScore(prediction.score)}, under the ` +
        `new-turtle line. Add this photo to ${prediction.individual_id} anyway?`)) return;
    confirmMatch(card, file, prediction.individual_id, false);
  };
  actions.append(el("button", { onclick: add }, `It is ${prediction.individual_id}: add this photo`));
  return el("tr", { "data-individual": prediction.individual_id }, el("td", {}, rank),
    el("td", {}, prediction.individual_id),
    el("td", {}, el("span", { className: "bar", style: `width:${width}px` }), formatScore(prediction.score)),
    el("td", {}, thumb), verified ? el("td", {}, points) : null, el("td", {}, actions));
}

async function showMatches(explain, file, prediction) {
  explain.replaceChildren(el("p", { className: "muted" }, "Drawing the matching points…"));
  const form = new FormData();
  form.append("file", file);
  form.append("individual_id", prediction.individual_id);
  form.append("image_id", String(prediction.evidence.image_id));
  try {
    const response = await api("/identify/explain", { method: "POST", body: form });
    const inliers = response.headers.get("X-Inliers");
    const tilted = response.headers.get("X-Fallback") === "true"
      ? " once a change of camera angle was simulated" : "";
    const image = el("img", { alt: `matching points between your photo and ${prediction.individual_id}`,
                              src: URL.createObjectURL(await response.blob()) });
    // the drawing's own count (it can be the fallback's, more than the answer counted), as the service judged it
    const chance = response.headers.get("X-Inliers-Counted") === "false"
      ? ` That is no more than photos of two different turtles reach by chance, so the score ignores these ` +
        `points: ${prediction.individual_id}'s score rests on the two photos' overall similarity alone.`
      : "";
    explain.replaceChildren(el("p", {}, `${inliers} points of your photo match points of ` +
      `${prediction.individual_id}'s photo in a consistent arrangement${tilted} (lines join them).${chance}`), image);
  } catch (error) {
    explain.replaceChildren(el("p", { className: "message error" }, error.message));
  }
}

/** Save the photo to an individual (a new one, or one it was matched to), then identify it again to show it. */
async function confirmMatch(card, file, individualId, isNew) {
  clearMessage();
  // one save at a time: a second click while the first is on its way would enrol the same id twice (a 409)
  const buttons = [...card.querySelectorAll("button")].filter((button) => !button.disabled);
  for (const button of buttons) button.disabled = true;
  card.dataset.busy = "true";  // and no other card's save redraws it meanwhile
  try {
    await saveToIndividual(card, file, individualId, isNew);
  } finally {
    delete card.dataset.busy;
    for (const button of buttons) button.disabled = false;
  }
}

async function saveToIndividual(card, file, individualId, isNew) {
  const form = photoForm([file], [card.querySelector("input.view").value.trim()]);
  const path = isNew ? "/individuals" : `/individuals/${encodeURIComponent(individualId)}/images`;
  if (isNew) form.append("individual_id", individualId);
  try {
    const saved = await (await api(path, { method: "POST", body: form })).json();
    const already = saved.images.every((image) => image.already_enrolled);
    showSaved(saved, already ? `This photo was already enrolled for ${individualId}.`
      : isNew ? `Enrolled ${individualId} with this photo.` : `Added this photo to ${individualId}.`);
    refreshHealth();
    card.dataset.saved = individualId;
    if (isNew) card.querySelector("input.new-id").value = "";  // done with: the redraw must not offer it again
    await identifyInto(card, file, `Identified again after saving it to ${individualId}:`);
    identifyOthersAgain(savedNote(individualId));  // not awaited: this card is free to use meanwhile
  } catch (error) {
    showMessage(`Could not save the photo to ${individualId}: ${error.message}`);
  }
}

let identifyRound = 0;  // each change of the gallery starts a round; only the latest round's answers are drawn
const savedNote = (individualId) => `Identified again now that photos of ${individualId} were saved:`;

/** Photos identified before the gallery changed were never offered an individual just enrolled, were not scored
 *  against photos just added, or still offer one just deleted: the cards not saved yet are identified again (with
 *  ``note`` saying why), so the next photo of a turtle just enrolled is one click away. A later change starts a new
 *  round, which ends this one. */
async function identifyOthersAgain(note, which = () => true) {
  const round = ++identifyRound;
  const current = () => round === identifyRound;
  const cards = [...document.querySelectorAll(".card.result")]
    .filter((card) => !card.dataset.saved && !card.dataset.busy && !card.dataset.refused && which(card));
  for (const card of cards) {
    if (!current()) return;
    await identifyInto(card, card.fileToIdentify, note, current);
  }
}

/** Cards saved to a deleted individual (or one that lost a photo) are identified again like the others. */
function unsave(individualId) {
  for (const card of document.querySelectorAll(".card.result")) {
    if (card.dataset.saved === individualId) delete card.dataset.saved;
  }
}

// -- individuals ----------------------------------------------------------------------------------------------

let listed = 0;
let listing = 0;  // the latest listing asked for (tab opened, search typed, more asked for): older answers are dropped
let searchTimer = null;

$("search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => loadIndividuals(true), 250);
});
$("more").addEventListener("click", () => loadIndividuals(false));

/** List individuals from the first (``reset``) or the next page. A double click, or a search typed while an answer
 *  is on its way, asks again before the first answer arrives: only the latest answer is shown, and "Show more"
 *  asks for one page at a time, so no individual is listed twice or skipped. */
async function loadIndividuals(reset) {
  if (reset) $("individual-detail").hidden = true;
  else if ($("more").disabled) return;
  const current = ++listing;
  const offset = reset ? 0 : listed;
  $("more").disabled = true;
  const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(offset), q: $("search").value.trim() });
  try {
    const page = await (await api(`/individuals?${query}`)).json();
    if (current !== listing) return;
    if (reset) $("individual-grid").replaceChildren();
    for (const item of page.items) $("individual-grid").append(individualTile(item));
    listed = offset + page.items.length;
    $("individual-count").textContent = page.total === 0
      ? ($("search").value.trim() ? "No individual matches this search." : "No individual is enrolled yet.")
      : `${page.total} individual${page.total === 1 ? "" : "s"}`;
    $("more").hidden = listed >= page.total;
  } catch (error) {
    if (current === listing) showMessage(error.message);
  } finally {
    if (current === listing) $("more").disabled = false;
  }
}

function individualTile(item) {
  const picture = item.cover_url
    ? loadImage(el("img", { alt: `photo of ${item.individual_id}` }), `${item.cover_url}?max_side=256`)
    : el("div", { className: "empty" });
  return el("button", { className: "tile", "data-individual": item.individual_id,
                        onclick: () => showIndividual(item.individual_id) },
    picture, el("strong", {}, item.individual_id),
    el("span", { className: "muted" }, `${item.image_count} photo${item.image_count === 1 ? "" : "s"}`));
}

/** Show an individual's page; ``pending`` photos (``{files, views}``: ones that could not be sent) are listed in
 *  its "Add photos" list, ready to be sent again or left out. */
async function showIndividual(individualId, pending = null) {
  clearMessage();
  const detail = $("individual-detail");
  let individual;
  try {
    individual = await (await api(`/individuals/${encodeURIComponent(individualId)}`)).json();
  } catch (error) {
    showMessage(error.message);
    return;
  }
  // its tile in the grid shows what was just read (photos added or deleted change its count and cover)
  const tile = [...document.querySelectorAll("#individual-grid .tile")]
    .find((node) => node.dataset.individual === individualId);
  if (tile) tile.replaceWith(individualTile(individual));
  const photos = individual.images.map((image) => el("figure", {},
    loadImage(el("img", { alt: `photo ${image.image_id} of ${individualId}` }), `${image.url}?max_side=320`),
    el("figcaption", {}, `photo ${image.image_id}` + (image.view ? ` · ${image.view}` : "") +
      ` · ${image.created.slice(0, 10)}`),
    el("button", { className: "danger", onclick: () => deletePhoto(individualId, image.image_id) }, "Delete photo")));
  const chosen = el("div", {});
  const listPhotos = (files, views) => chosen.replaceChildren(photoList(files, `Add these photos to ${individualId}`,
    (chosenFiles, chosenViews) => addPhotos(individualId, chosenFiles, chosenViews), views));
  const adder = el("input", { type: "file", accept: "image/*", multiple: true, "aria-label": "add photos",
                              onchange: (event) => listPhotos([...event.target.files]) });
  if (pending) listPhotos(pending.files, pending.views);
  detail.replaceChildren(el("article", { className: "card", id: "individual-card" },
    el("h2", {}, individualId),
    el("p", { className: "muted" }, `${individual.image_count} photo${individual.image_count === 1 ? "" : "s"} · enrolled ${individual.created.slice(0, 10)}`),
    el("div", { className: "photos" }, photos),
    el("p", { className: "actions" }, el("label", {}, "Add photos: ", adder)), chosen,
    el("p", { className: "actions danger-zone" },
      el("button", { className: "danger", onclick: () => deleteIndividual(individualId) },
        `Delete ${individualId} and all its photos`))));
  detail.hidden = false;
  detail.scrollIntoView({ behavior: "smooth" });
}

async function addPhotos(individualId, files, views) {
  const images = `/individuals/${encodeURIComponent(individualId)}/images`;
  let saved;
  try {
    saved = await sendPhotos(files, views, images, {}, images);
  } catch (error) {
    showMessage(`Could not add the photos to ${individualId}: ${error.message}`);
    return;
  }
  await confirmSent(individualId, saved, `Added {} to ${individualId}.`);
}

/** What a request that failed after others were stored left out: the photos, named, and where they wait. */
function unsentNote(unsent) {
  const names = unsent.files.map((file) => file.name).join(", ");
  return `${plural(unsent.files.length, "other photo")} could not be added (${names}): ${unsent.error.message}. ` +
         `${unsent.files.length === 1 ? "It is" : "They are"} listed under "Add photos" below, to send again or leave out.`;
}

/** Confirm a save; a photo that is now filed under more than one individual turns it into a warning, since that
 *  is almost always a slip (the service allows it: it cannot know which filing is wrong). */
function showSaved(saved, text, level = "ok") {
  const twice = saved.images.filter((image) => image.also_enrolled_as.length);
  if (!twice.length) {
    showMessage(text, level);
    return;
  }
  const where = twice.map((image) => `photo ${image.image_id} is also enrolled as ` +
                                     image.also_enrolled_as.join(", "));
  showMessage(`${text} Check it: ${where.join("; ")}. One photo under two individuals is usually a mistake: delete ` +
              "it from the wrong one in the Individuals tab.", "warn");
}

/** A confirmation that counts the photos stored, and says which were there already (the service keeps one copy
 *  of a photo, with the view it was first given). */
function savedPhotos(saved, sentence) {
  const already = saved.images.filter((image) => image.already_enrolled).length;
  const added = saved.images.length - already;
  return sentence.replace("{}", plural(added, "photo")) + (already
    ? ` ${plural(already, "other photo")} ${already === 1 ? "was" : "were"} stored already (chosen twice, or ` +
      `enrolled before) and ${already === 1 ? "keeps its" : "keep their"} first view.`
    : "");
}

// a new individual with all the photos the user has of it, each with its view
$("new-files").addEventListener("change", (event) => {
  $("new-photos").replaceChildren(photoList([...event.target.files], "Enrol the new individual", enrolNew));
});
$("new-individual").addEventListener("submit", (event) => {  // Enter in the id box enrols, once photos are chosen
  event.preventDefault();
  const enrol = $("new-photos").querySelector(".photo-list > button");
  if (enrol) enrol.click();
  else showMessage("Choose the new individual's photos first.");
});

async function enrolNew(files, views) {
  clearMessage();
  const individualId = typedId($("new-id"));
  if (!individualId) return;
  let saved;
  try {
    saved = await sendPhotos(files, views, "/individuals", { individual_id: individualId },
                             `/individuals/${encodeURIComponent(individualId)}/images`);
  } catch (error) {
    showMessage(`Could not enrol ${individualId}: ${error.message}`);
    return;
  }
  $("new-individual").reset();
  $("new-photos").replaceChildren();
  $("search").value = "";
  await loadIndividuals(true);
  await confirmSent(individualId, saved, `Enrolled ${individualId} with {}.`);
}

async function deletePhoto(individualId, imageId) {
  if (!confirm(`Delete photo ${imageId} of ${individualId}? This cannot be undone.`)) return;
  try {
    await api(`/individuals/${encodeURIComponent(individualId)}/images/${imageId}`, { method: "DELETE" });
    await showIndividual(individualId);
    showMessage(`Deleted photo ${imageId} of ${individualId}.`, "ok");
    refreshHealth();
    unsave(individualId);
    identifyOthersAgain(`Identified again now that a photo of ${individualId} was deleted:`);
  } catch (error) {
    showMessage(error.message);
  }
}

async function deleteIndividual(individualId) {
  if (!confirm(`Delete ${individualId} and all its photos? This cannot be undone.`)) return;
  try {
    await api(`/individuals/${encodeURIComponent(individualId)}`, { method: "DELETE" });
    await loadIndividuals(true);
    showMessage(`Deleted ${individualId}.`, "ok");
    refreshHealth();
    unsave(individualId);
    identifyOthersAgain(`Identified again now that ${individualId} was deleted:`);
  } catch (error) {
    showMessage(error.message);
  }
}

// -- similarity map -------------------------------------------------------------------------------------------

$("rsm-show").addEventListener("click", async () => {
  clearMessage();
  const names = $("rsm-individuals").value.split(",").map((name) => name.trim()).filter(Boolean);
  const query = names.length ? `?${new URLSearchParams({ individuals: names.join(",") })}` : "";
  try {
    const blob = await (await api(`/rsm.png${query}`)).blob();
    $("rsm-image").src = URL.createObjectURL(blob);
    $("rsm-figure").hidden = false;
  } catch (error) {
    showMessage(error.message);
  }
});

refreshHealth();
