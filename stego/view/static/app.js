// stego view: the page over one RESULTS folder. Plain JavaScript, no build step.
// Every text that comes from the results (names, file names) goes through textContent or an
// input's value, never innerHTML, so a name like <img onerror=...> shows as typed.
"use strict";

const PAGE_SIZE = 48;
let state = null; // /api/state: clusters, saved class map, pixel shares
let names = []; // the name each cluster has on the page (edited, not yet saved)
let offset = 0; // first image of the grid page
let total = 0; // images that pass the filter

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

async function getJSON(url, options) {
  const response = await fetch(url, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function showStatus(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

const percent = (x) => (100 * x).toFixed(x >= 0.1 ? 1 : 2) + " %";
const rgb = (c) => `rgb(${c[0]}, ${c[1]}, ${c[2]})`;

// A colour square; set through the style object, which the page's content policy allows.
function swatch(colour) {
  const node = el("span", { className: "swatch" });
  node.style.background = rgb(colour);
  return node;
}

function savedNames() {
  const { names: classNames, mapping } = state.classes;
  return state.clusters.map((c) => classNames[mapping[c.id]]);
}

function edited() {
  return names.some((name, c) => name !== savedNames()[c]);
}

// The colour of each cluster while editing: a name that is saved keeps its class colour; a
// new name takes the colour of the first cluster given it.
function clusterColours() {
  const { names: classNames, colors, mapping } = state.classes;
  return names.map((name) => {
    const saved = classNames.indexOf(name);
    return saved >= 0 ? colors[saved] : colors[mapping[names.indexOf(name)]];
  });
}

// ---------------------------------------------------------------- classes and clusters
function renderLegend() {
  const { names: classNames, colors, share } = state.classes;
  $("legend").replaceChildren(
    ...classNames.map((name, k) =>
      el("li", {}, [
        swatch(colors[k]),
        " ",
        el("span", { className: "name", textContent: name }),
        el("span", { className: "share", textContent: percent(share[k]) }),
      ]),
    ),
  );
}

function mergeSelect(cluster) {
  const select = el("select", { className: "merge" }, [el("option", { value: "", textContent: "—" })]);
  for (const other of state.clusters) {
    if (other.id === cluster) continue;
    select.append(el("option", { value: other.id, textContent: `cluster ${other.id}: ${names[other.id]}` }));
  }
  select.addEventListener("change", () => {
    if (select.value === "") return;
    names[cluster] = names[Number(select.value)];
    onEdit();
  });
  return select;
}

function renderClusters() {
  const colours = clusterColours();
  const saved = savedNames();
  const rows = state.clusters.map((c) => {
    const input = el("input", { className: "name", value: names[c.id], type: "text", maxLength: 80 });
    input.classList.toggle("changed", names[c.id] !== saved[c.id]);
    input.dataset.cluster = c.id;
    input.addEventListener("change", () => {
      names[c.id] = input.value.trim() || saved[c.id];
      onEdit();
    });
    const crops = c.crops.map((i) => el("img", { src: `/crop/${c.id}/${i}.jpg`, alt: "", loading: "lazy" }));
    return el("tr", {}, [
      el("td", { className: "num", textContent: c.id }),
      el("td", {}, [swatch(colours[c.id])]),
      el("td", {}, [input]),
      el("td", { className: "num", textContent: percent(c.share) }),
      el("td", { className: "num", textContent: c.images }),
      el("td", {}, [mergeSelect(c.id)]),
      el("td", {}, [el("div", { className: "crops" }, crops)]),
    ]);
  });
  $("clusters").tBodies[0].replaceChildren(...rows);
  const chosen = $("filter").value;
  $("filter").replaceChildren(
    el("option", { value: "", textContent: "all images" }),
    ...state.clusters.map((c) =>
      el("option", { value: c.id, textContent: `images with cluster ${c.id}: ${names[c.id]}` }),
    ),
  );
  $("filter").value = chosen;
}

function onEdit() {
  renderClusters();
  recolour();
  showStatus(edited() ? "unsaved edits" : "", edited() ? "dirty" : "");
}

async function save() {
  const body = { names: Object.fromEntries(names.map((name, c) => [c, name])) };
  showStatus("saving…");
  $("save").disabled = true;
  try {
    state = await getJSON("/api/save", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    names = savedNames();
    renderLegend();
    onEdit();
    showStatus("saved to model/classes.json");
  } catch (error) {
    showStatus(`not saved: ${error.message}`, "error");
  } finally {
    $("save").disabled = false;
  }
}

// ---------------------------------------------------------------- overlays
// An overlay canvas is painted from an image of cluster ids (grey level = id) in the colour of
// each pixel's cluster; the ids are kept with the canvas so a rename only repaints.
function paint(canvas, idImage) {
  if (!canvas.ids) {
    canvas.width = idImage.naturalWidth;
    canvas.height = idImage.naturalHeight;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(idImage, 0, 0);
    canvas.ids = ctx.getImageData(0, 0, canvas.width, canvas.height);
  }
  const colours = clusterColours();
  const ids = canvas.ids.data;
  const out = new ImageData(canvas.width, canvas.height);
  for (let p = 0; p < ids.length; p += 4) {
    const colour = colours[ids[p]] || [0, 0, 0];
    out.data[p] = colour[0];
    out.data[p + 1] = colour[1];
    out.data[p + 2] = colour[2];
    out.data[p + 3] = 255;
  }
  canvas.getContext("2d").putImageData(out, 0, 0);
}

function recolour() {
  for (const canvas of document.querySelectorAll("canvas.overlay")) {
    if (canvas.ids) paint(canvas, null);
  }
}

function setOpacity() {
  for (const canvas of document.querySelectorAll("canvas.overlay")) {
    canvas.style.opacity = $("opacity").value / 100;
  }
}

function overlaid(photoUrl, idsUrl, canvas) {
  const photo = el("img", { src: photoUrl, alt: "", className: "photo" });
  const ids = el("img", { src: idsUrl, alt: "", className: "ids" });
  canvas.className = "overlay";
  canvas.style.opacity = $("opacity").value / 100;
  ids.addEventListener("load", () => paint(canvas, ids));
  return el("div", { className: "stack" }, [photo, canvas, ids]);
}

// ---------------------------------------------------------------- images
async function loadPage() {
  const cluster = $("filter").value;
  const page = await getJSON(`/api/images?offset=${offset}&limit=${PAGE_SIZE}&cluster=${cluster}`);
  total = page.total;
  const tiles = page.items.map((item) => {
    const tile = el("figure", { className: "tile" }, [
      overlaid(`/thumb/${item.index}.jpg`, `/thumb-ids/${item.index}.png`, el("canvas")),
      el("figcaption", { textContent: item.name, title: item.name }),
    ]);
    tile.addEventListener("click", () => openLarge(item));
    return tile;
  });
  $("grid").replaceChildren(...tiles);
  const pages = Math.max(1, Math.ceil(total / PAGE_SIZE));
  $("page").textContent = `page ${Math.floor(offset / PAGE_SIZE) + 1} of ${pages} (${total} images)`;
  $("prev").disabled = offset === 0;
  $("next").disabled = offset + PAGE_SIZE >= total;
}

function openLarge(item) {
  const canvas = $("large-overlay");
  canvas.ids = null;
  $("large-name").textContent = `${item.name} (${item.width} × ${item.height})`;
  const stack = overlaid(`/image/${item.index}.jpg`, `/ids/${item.index}.png`, canvas);
  canvas.id = "large-overlay";
  stack.addEventListener("mousemove", (event) => showHover(event, stack, canvas));
  stack.addEventListener("mouseleave", () => ($("hover").textContent = ""));
  document.querySelector("#large .stack").replaceWith(stack);
  $("large").hidden = false;
}

function showHover(event, stack, canvas) {
  if (!canvas.ids) return;
  const box = stack.getBoundingClientRect();
  const x = Math.floor(((event.clientX - box.left) / box.width) * canvas.width);
  const y = Math.floor(((event.clientY - box.top) / box.height) * canvas.height);
  if (x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return;
  const cluster = canvas.ids.data[4 * (y * canvas.width + x)];
  $("hover").textContent = `cluster ${cluster}: ${names[cluster]}`;
}

// ---------------------------------------------------------------- start
async function start() {
  state = await getJSON("/api/state");
  names = savedNames();
  $("results").textContent = state.results;
  renderLegend();
  renderClusters();
  await loadPage();
  if (state.images_missing) {
    showStatus(`${state.images_missing} segmented images were not found: their overlays are shown`);
  }
  $("save").addEventListener("click", save);
  $("revert").addEventListener("click", () => {
    names = savedNames();
    onEdit();
  });
  $("filter").addEventListener("change", () => {
    offset = 0;
    loadPage();
  });
  $("opacity").addEventListener("input", setOpacity);
  $("prev").addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE_SIZE);
    loadPage();
  });
  $("next").addEventListener("click", () => {
    offset += PAGE_SIZE;
    loadPage();
  });
  $("close").addEventListener("click", () => ($("large").hidden = true));
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape") $("large").hidden = true;
  });
  window.addEventListener("beforeunload", (event) => {
    if (edited()) event.preventDefault();
  });
  document.body.dataset.ready = "true";
}

start().catch((error) => showStatus(`could not load the results: ${error.message}`, "error"));
