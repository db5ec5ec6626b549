// The page: pick an image (or, for a video model, a video), ask, watch the answer stream in, and see which
// patches the model kept (from the report the server sends with each answer), frame by frame for a video. The
// conversation is kept here and sent whole with every question.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let settings = null;
let image = null;        // the picked image as a data: URL
let video = null;        // or the picked video as a data: URL (the server samples its frames)
let messages = [];       // the conversation so far, in the API's format
let busy = false;

async function start() {
  try {
    const reply = await fetch("/v1/settings");
    settings = await reply.json();
  } catch (e) {
    return showError(`cannot reach the server: ${e}`);
  }
  const frames = settings.n_frames ? `; videos of ${settings.n_frames} frames` : "";
  $("model").textContent = `${settings.model}: ${settings.patch_grid} x ${settings.patch_grid} patches per image${frames}`;
  if (settings.n_frames) {
    $("file").accept = "image/*,video/*,.mkv";
    $("drop-hint").textContent = "Drop an image or a video here, or click to pick one";
  }
  for (const name of settings.methods) $("method").add(new Option(name, name));
  const chosen = settings.default_prune;
  $("method").value = chosen ? chosen.method : "none";
  if (chosen) {
    $("ratio").value = chosen.ratio;
    if (chosen.k !== null) $("k").value = chosen.k;
  }
  $("key-label").hidden = !settings.api_key_required;
  $("max-tokens").value = Math.min(64, settings.max_tokens);
  if (settings.vocabulary) {  // a word-level model (the tiny ones) reads only these: say so before any error does
    $("vocabulary").textContent = `This model knows only these ${settings.vocabulary.length} words and signs: ` +
      settings.vocabulary.join(" ");
    $("vocabulary").hidden = false;
  }
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

// The image as the model sees it: "pad" centres it on a square of the mean colour, "crop" takes the centre,
// "squash" stretches the whole image to a square (Qwen-VL).
function modelView(img) {
  const side = Math.max(img.width, img.height), small = Math.min(img.width, img.height);
  const canvas = document.createElement("canvas");
  const ctx = canvas.getContext("2d");
  if (settings.image_mode === "pad") {
    canvas.width = canvas.height = side;
    const [r, g, b] = settings.image_mean.map((m) => Math.round(m * 255));
    ctx.fillStyle = `rgb(${r}, ${g}, ${b})`;
    ctx.fillRect(0, 0, side, side);
    ctx.drawImage(img, (side - img.width) / 2, (side - img.height) / 2);
  } else if (settings.image_mode === "squash") {
    canvas.width = canvas.height = side;
    ctx.drawImage(img, 0, 0, side, side);
  } else {
    canvas.width = canvas.height = small;
    ctx.drawImage(img, (img.width - small) / 2, (img.height - small) / 2, small, small, 0, 0, small, small);
  }
  return canvas.toDataURL();
}

function isVideo(file) {
  return file.type.startsWith("video/") || /\.(mkv|webm|mp4|mov|avi|gif)$/i.test(file.name) && !file.type.startsWith("image/");
}

function pick(file) {
  if (file && settings.n_frames && isVideo(file)) return pickVideo(file);
  if (!file || !file.type.startsWith("image/")) return showError("that is not an image file");
  const reader = new FileReader();
  reader.onload = () => {
    const img = new Image();
    img.onload = () => {
      image = reader.result;
      video = null;
      $("image").src = modelView(img);
      $("view").hidden = false;
      $("frames").hidden = true;
      $("drop-hint").hidden = true;
      drawOverlay(null);
      resetConversation();
      showError("");
    };
    img.onerror = () => showError("the browser cannot read that image");
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

// A video: the server sends the frames it samples, as the model sees them; each is drawn with its own overlay.
function pickVideo(file) {
  const reader = new FileReader();
  reader.onload = async () => {
    const headers = {"Content-Type": "application/json"};
    if ($("key").value) headers.Authorization = `Bearer ${$("key").value}`;
    try {
      const reply = await fetch("/v1/frames", {method: "POST", headers, body: JSON.stringify({video: reader.result})});
      const body = await reply.json();
      if (!reply.ok) throw new Error(body.error.message);
      video = reader.result;
      image = null;
      $("frames").replaceChildren(...body.frames.map((src, f) => {
        const frame = document.createElement("div");
        frame.className = "frame";
        const img = document.createElement("img");
        img.src = src;
        img.alt = `frame ${f}`;
        const cls = document.createElement("div");
        cls.className = "cls";
        frame.append(img, document.createElementNS(SVG, "svg"), cls);
        return frame;
      }));
      $("frames").hidden = false;
      $("view").hidden = true;
      $("drop-hint").hidden = true;
      resetConversation();
      showError("");
    } catch (e) {
      showError(`the server cannot read that video: ${e.message || e}`);
    }
  };
  reader.readAsDataURL(file);
}

// One rect per patch: kept ones outlined, dropped ones dimmed; nothing before the first answer. For a video,
// one overlay per frame and a bar under it for its class token (keptClass: the frames whose class token was kept).
function drawOverlay(keptPatches, keptClass = null) {
  $("legend").hidden = keptPatches === null;
  $("legend-video").hidden = !video;
  if (video) {
    [...$("frames").children].forEach((frame, f) => {
      drawGrid(frame.querySelector("svg"), keptPatches === null ? null : keptPatches[f]);
      frame.querySelector(".cls").className = keptClass === null ? "cls" : `cls ${keptClass.includes(f) ? "kept" : "dropped"}`;
    });
    return;
  }
  drawGrid($("overlay"), keptPatches);
}

function drawGrid(svg, keptPatches) {
  const n = settings.patch_grid;
  svg.setAttribute("viewBox", `0 0 ${n} ${n}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.replaceChildren();
  if (keptPatches === null || keptPatches === undefined) return;
  const kept = new Set(keptPatches);
  for (let i = 0; i < n * n; i++) {
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", i % n);
    rect.setAttribute("y", Math.floor(i / n));
    rect.setAttribute("width", 1);
    rect.setAttribute("height", 1);
    rect.setAttribute("class", kept.has(i) ? "kept" : "dropped");
    svg.appendChild(rect);
  }
}

function showReport(usage) {
  const ms = (s) => `${(s * 1000).toFixed(0)} ms`;
  $("kept").textContent = `${usage.image_tokens_kept} / ${usage.image_tokens}`;
  $("flops").textContent = `${(100 * usage.prefill_flops / usage.prefill_flops_unpruned).toFixed(1)}% of unpruned`;
  $("prefill").textContent = ms(usage.prefill_s);
  const steps = usage.completion_tokens - 1;
  $("decode").textContent = steps > 0 ? `${ms(usage.decode_s)} (${(steps / usage.decode_s).toFixed(1)} tokens/s)` : "-";
  $("report").hidden = false;
  $("kept-label").textContent = video ? "video tokens kept" : "image tokens kept";
  if (video) drawOverlay(usage.kept_patches, usage.kept_class_tokens ? usage.kept_class_tokens[0] : []);
  else drawOverlay(usage.kept_patches.length ? usage.kept_patches[0] : null);
}

function addTurn(role, text) {
  const li = document.createElement("li");
  li.className = role;
  li.textContent = text;
  $("turns").appendChild(li);
  return li;
}

function request(question) {
  const media = image ? {type: "image_url", image_url: {url: image}} : {type: "video_url", video_url: {url: video}};
  const content = messages.length === 0 && (image || video) ? [media, {type: "text", text: question}] : question;
  const body = {model: settings.model, messages: [...messages, {role: "user", content}], stream: true,
                stream_options: {include_usage: true}, temperature: 0, max_tokens: Number($("max-tokens").value),
                prune: $("method").value};
  if (body.prune !== "none") {
    body.prune_ratio = Number($("ratio").value);
    if ($("k").value !== "") body.prune_k = Number($("k").value);
  }
  return {body, content};
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || busy) return;
  if (messages.length === 0 && !image && !video) {  // the page is about pictures: nothing is sent without one
    return showError(`Pick ${settings && settings.n_frames ? "an image or a video" : "an image"} first (drop it on ` +
                     "the left): the questions here are about it.");
  }
  busy = true;
  $("send").disabled = true;
  showError("");
  const {body, content} = request(question);
  addTurn("user", question);
  const answer = addTurn("assistant", "");
  answer.classList.add("streaming");
  const headers = {"Content-Type": "application/json"};
  if ($("key").value) headers.Authorization = `Bearer ${$("key").value}`;
  let text = "";
  try {
    const reply = await fetch("/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    if (!reply.ok) throw new Error((await reply.json()).error.message);
    const reader = reply.body.getReader(), decoder = new TextDecoder();
    let pending = "", usage = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      pending += decoder.decode(value, {stream: true});
      const events = pending.split("\n\n");
      pending = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) {
          if (choice.delta.content) text += choice.delta.content;
        }
        answer.textContent = text;
      }
    }
    messages.push({role: "user", content}, {role: "assistant", content: text});
    if (usage) {
      showReport(usage);
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = `${usage.pruning}: ${usage.image_tokens_kept}/${usage.image_tokens} ${video ? "video" : "image"} tokens kept`;
      answer.appendChild(note);
    }
    $("question").value = "";
  } catch (e) {
    answer.remove();
    $("turns").lastChild.remove();
    showError(String(e.message || e));
  } finally {
    answer.classList.remove("streaming");
    answer.classList.add("done");
    busy = false;
    $("send").disabled = false;
  }
}

function resetConversation() {
  messages = [];
  $("turns").replaceChildren();
  $("report").hidden = true;
  if (settings) drawOverlay(null);
}

$("file").addEventListener("change", () => pick($("file").files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  pick(e.dataTransfer.files[0]);
});
$("ask").addEventListener("submit", ask);
$("reset").addEventListener("click", resetConversation);
start();
