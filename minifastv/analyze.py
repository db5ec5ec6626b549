"""Where the attention goes, layer by layer (the phenomenon behind FastV, the paper's Figures 1-2), and a
picture of the image patches (or a video's, frame by frame) FastV keeps."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from .anyres import kept_on_grid
from .image import tokens_per_image
from .plot import label_font

SEGMENTS = ("system", "image", "instruction")


@torch.inference_mode()
def attention_shares(model, input_ids, pixel_values, **visual) -> list[dict[str, list[float]]]:
    """Per decoder layer, how the head-averaged attention of the instruction tokens splits over the system
    tokens (text before the first image), the image tokens (a video's among them) and the instruction tokens
    (text after the last image). Returns, per layer, {"last": [3 shares] of the prompt's last token,
    "instruction": [3 shares] averaged over all instruction tokens}. One prompt, no padding; the decoder
    computes the rows (prefill's attention_rows: the instruction tokens' queries against each layer's keys),
    never a T x T matrix. `visual`: a family's other inputs (video_values)."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"attention analysis takes one prompt, got a batch of {input_ids.shape[0]}")
    placeholders = torch.isin(input_ids[0], torch.tensor(list(model.spans()))).nonzero()[:, 0]
    if len(placeholders) == 0:
        raise ValueError("attention analysis needs an image in the prompt")
    n_instruction = input_ids.shape[1] - 1 - int(placeholders[-1])
    if n_instruction == 0:
        raise ValueError("attention analysis needs text after the last image")
    pre = model.prefill(input_ids, pixel_values, attention_rows=n_instruction, **visual)
    image_mask = pre.image_mask[0].cpu()
    slot = torch.arange(len(image_mask))
    segment = torch.full((len(slot),), 2)                              # instruction
    segment[slot < slot[image_mask].min()] = 0                         # system
    segment[image_mask] = 1                                            # image
    out = []
    for rows in pre.attention:
        probs = rows[0].cpu()                                                             # Q, T
        shares = torch.zeros(n_instruction, 3).index_add_(1, segment, probs)              # Q, 3
        out.append({"last": shares[-1].tolist(), "instruction": shares.mean(0).tolist()})
    return out


def kept_patches_picture(view: Image.Image, grid: int, kept: list[int], scale: int = 6) -> Image.Image:
    """The model's view of the image, enlarged, with dropped patches dimmed and kept ones outlined.
    `kept` are patch indices in row-major order."""
    big = view.resize((view.width * scale, view.height * scale), Image.Resampling.NEAREST)
    cell = big.width / grid
    return outlined(big, [(c * cell, r * cell, (c + 1) * cell, (r + 1) * cell) for r in range(grid) for c in range(grid)],
                    kept)


def kept_cells_picture(image: Image.Image, boxes: list[tuple[float, ...]], kept: list[int],
                       longest: int = 1344) -> Image.Image:
    """LLaVA-NeXT: the image itself (at most `longest` pixels on its longer side) with the cells of its tile
    grid (boxes in its pixels, anyres.cell_boxes) dimmed where dropped and outlined where kept."""
    f = min(1.0, longest / max(image.size))
    picture = image.convert("RGB").resize((max(1, round(image.width * f)), max(1, round(image.height * f))))
    return outlined(picture, [tuple(v * f for v in box) for box in boxes], kept)


def outlined(picture: Image.Image, boxes: list[tuple[float, ...]], kept: list[int]) -> Image.Image:
    """`picture` dimmed but for the boxes (left, top, right, bottom) of the indices `kept`, which are outlined."""
    dim = Image.blend(picture, Image.new("RGB", picture.size, (0, 0, 0)), 0.7)
    chosen = [(x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)) for x0, y0, x1, y1 in (boxes[i] for i in kept)]
    mask = Image.new("L", picture.size, 0)
    pen = ImageDraw.Draw(mask)
    for box in chosen:
        pen.rectangle(box, fill=255)
    out = Image.composite(picture, dim, mask)
    outline = ImageDraw.Draw(out)
    for box in chosen:
        outline.rectangle(box, outline=(255, 200, 0))
    return out


def kept_patches(model, input_ids, pixel_values, method, **visual) -> list[int]:
    """Row-major patch indices, in the first image's grid, of that image's tokens that `method` keeps (LLaVA-NeXT:
    its base image's, the first of its tokens). `visual`: a family's other inputs (image_sizes)."""
    return kept_patches_and_share(model, input_ids, pixel_values, method, **visual)[0]


@torch.inference_mode()
def kept_patches_and_share(model, input_ids, pixel_values, method, **visual) -> tuple[list[int], float, dict | None]:
    """kept_patches, the share of the first sample's image tokens that `method` keeps, and (LLaVA-NeXT) the first
    image's kept tokens on its tile grid (anyres.kept_on_grid; None for the other families), from one prefill."""
    pre = model.prefill(input_ids, pixel_values, prune=method, **visual)
    first, kept = int(pre.image_mask[0].nonzero()[0]), pre.kept_image_slots()[0]
    n = tokens_per_image(model.config)
    on_grid = None
    if getattr(pre, "parts", None) is not None:
        labels = pre.parts[0, first:first + model.config.n_image_tokens(*visual["image_sizes"][0].tolist())]
        on_grid = kept_on_grid(labels.tolist(), [s - first for s in kept if s - first < len(labels)])
    return [s - first for s in kept if s - first < n], len(kept) / pre.n_image_tokens()[0], on_grid


LEGEND = "outlined: kept; dimmed: dropped"
VIDEO_LEGEND = LEGEND + "; bar under a frame: its class token"


def frames_picture(views: list[Image.Image], grid: int, kept: list[list[int]], class_kept: list[int],
                   scale: int, gap: int = 4) -> Image.Image:
    """A video's frames side by side, each as kept_patches_picture draws an image, with a bar under each frame:
    yellow where the frame's class token was kept, dark where it was dropped."""
    pictures = [kept_patches_picture(view, grid, k, scale) for view, k in zip(views, kept)]
    w, h = pictures[0].size
    bar = max(4, h // 12)
    out = Image.new("RGB", (len(pictures) * (w + gap) - gap, h + gap + bar), (255, 255, 255))
    pen = ImageDraw.Draw(out)
    for f, picture in enumerate(pictures):
        out.paste(picture, (f * (w + gap), 0))
        colour = (255, 200, 0) if f in class_kept else (60, 60, 60)
        pen.rectangle((f * (w + gap), h + gap, f * (w + gap) + w - 1, h + gap + bar - 1), fill=colour)
    return out


def picture_grid(pictures: list[tuple[str, Image.Image]], columns: int = 3, gap: int = 12,
                 legend: str = LEGEND) -> Image.Image:
    """Labelled pictures of one size on a grid of `columns`, on white, with the legend of the kept-patches
    pictures below."""
    w, h = pictures[0][1].size
    font, label = label_font(22), 30
    rows = -(-len(pictures) // columns)
    columns = min(columns, len(pictures))
    out = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + label + gap) + label), (255, 255, 255))
    pen = ImageDraw.Draw(out)
    for i, (name, picture) in enumerate(pictures):
        x, y = (i % columns) * (w + gap), (i // columns) * (h + label + gap)
        out.paste(picture, (x, y + label))
        pen.text((x + 2, y + 3), name, fill=(0, 0, 0), font=font)
    pen.text((2, out.height - label + 4), legend, fill=(0, 0, 0), font=font)
    return out
