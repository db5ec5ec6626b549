"""CLIP's text tower and its joint space, as CDPruner reads them: how relevant each image patch is to the
instruction. An optional part of a checkpoint (config.clip_text; `convert --clip-text` takes it from a full CLIP
checkpoint, whose vision half LLaVA already holds).

- The text tower is CLIP's: token and position embeddings, pre-LN blocks with quick_gelu attending causally (the
  vision tower's blocks, clip.py), a final LayerNorm, the pooled token (the end of text) through
  `text_projection`. An instruction longer than a chunk (77 tokens) is cut into chunks as the official CDPruner
  does: its ids (start and end of text included) zero-padded to a whole number of chunks, each chunk embedded alone.
- A patch's CLIP embedding: its feature-layer output (what LLaVA's projector reads) through the vision tower's
  `post_layernorm` and `visual_projection` (which LLaVA checkpoints do not carry).
- Relevance of a patch: its cosine similarity to the instruction's chunks, averaged over the chunks, times the
  tower's relevance_sign (config_clip.py). The pruning method normalises it (pruning/cdpruner.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlavaConfig
from .clip import VisionBlock

# LLaVA's evaluation prompts end short-answer questions with this line; the official CDPruner leaves it out of
# the text it gives CLIP, which reads the question alone.
SHORT_ANSWER = "answer the question using a single word or phrase."


class ClipText(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        cfg, vision = config.clip_text, config.vision
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embedding = nn.Parameter(torch.zeros(cfg.n_positions, cfg.dim))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.n_layers))
        for block in self.blocks:
            block.attn.causal = True
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.text_projection = nn.Linear(cfg.dim, cfg.projection_dim, bias=False)
        self.post_norm = nn.LayerNorm(vision.dim, eps=vision.norm_eps)
        self.visual_projection = nn.Linear(vision.dim, cfg.projection_dim, bias=False)
        # (the decoder's Tokenizer, to read the instruction back from a prompt's ids; CLIP's `tokenizers`
        # Tokenizer): set by checkpoint.load from tokenizer.json and clip_tokenizer.json.
        self.tokenizers = None

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Chunks of ids [M, L <= n_positions] -> their text embeddings [M, projection_dim] (transformers'
        CLIPTextModelWithProjection.text_embeds)."""
        M, L = ids.shape
        x = self.token_embedding(ids).to(self.final_norm.weight.dtype) + self.position_embedding[:L]
        for block in self.blocks:
            x = block(x)[0]
        x = self.final_norm(x)
        end = ids.argmax(-1) if self.cfg.eos_token_id is None else (ids == self.cfg.eos_token_id).int().argmax(-1)
        return self.text_projection(x[torch.arange(M, device=x.device), end])

    def chunks(self, text: str) -> torch.Tensor:
        """The instruction's CLIP ids as chunks [M, n_positions], zero-padded at the end (the official layout)."""
        ids = self.tokenizers[1].encode(text).ids
        n = self.cfg.n_positions
        ids = ids + [0] * (-len(ids) % n)
        return torch.tensor(ids, device=self.final_norm.weight.device).view(-1, n)

    def instruction(self, ids: list[int]) -> str:
        """The text CLIP reads for one prompt: the question of its last turn (Tokenizer.instruction), less the
        short-answer line of LLaVA's evaluation prompts."""
        text = self.tokenizers[0].instruction(ids)
        at = text.lower().find(SHORT_ANSWER)
        return (text[:at] + text[at + len(SHORT_ANSWER):]).strip() if at >= 0 else text

    def directions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, projection_dim] per prompt, the mean of its instruction's unit chunk embeddings: a unit patch
        embedding's dot product with it is the patch's mean cosine similarity to the chunks."""
        if self.tokenizers is None:
            raise ValueError("the CLIP text tower has no tokenizers: load the checkpoint with minifastv.load")
        texts = [self.instruction(row.tolist()) for row in input_ids]
        return torch.stack([F.normalize(self.encode_text(self.chunks(t)).float(), dim=-1).mean(0) for t in texts])

    def relevance(self, features: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Patch features at the vision tower's feature layer [N, n, vision dim] and each image's instruction
        direction [N, projection_dim] -> [N, n]: each patch's mean cosine similarity to its instruction,
        times relevance_sign."""
        patches = F.normalize(self.visual_projection(self.post_norm(features)).float(), dim=-1)
        return self.cfg.relevance_sign * torch.einsum("nsp,np->ns", patches, directions.to(patches.device))


# What each Pruner.vision_score asks of the vision side, for the messages of the models that cannot give it yet.
SCORES = {"cls_attention": "class-token attention (fastervlm, visionzip)",
          "relevance": "patches' relevance to the instruction (cdpruner)"}
NO_TOWER = ("this checkpoint has no CLIP text tower, and CDPruner ranks the image tokens by their relevance to the "
            "instruction as CLIP reads it: add the tower with `python convert_weights.py SRC OUT --clip-text DIR` "
            "(DIR: a full CLIP checkpoint in the transformers layout, e.g. openai/clip-vit-large-patch14-336)")


def relevance(model, features: torch.Tensor, input_ids: torch.Tensor, token_id: int) -> torch.Tensor:
    """[N, n] each image's patches' relevance to the instruction of the prompt that holds it (its placeholder's
    row of input_ids; images in placeholder order), from their feature-layer outputs [N, n, vision dim]."""
    if model.clip_text is None:
        raise ValueError(getattr(model, "no_clip_text", NO_TOWER))   # a family's own reason, else how to add it
    rows = (input_ids == token_id).nonzero()[:, 0]
    return model.clip_text.relevance(features, model.clip_text.directions(input_ids)[rows])
