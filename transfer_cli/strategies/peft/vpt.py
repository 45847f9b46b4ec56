"""Visual prompt tuning (Jia et al., "Visual Prompt Tuning", ECCV 2022) for timm ViTs, and prompt tuning
(Lester, Al-Rfou & Constant, "The Power of Scale for Parameter-Efficient Prompt Tuning", EMNLP 2021) for
Hugging Face text encoders.

ViT: `strategy.num_tokens` learnable tokens enter the first block right after the class (and register)
tokens, without position embeddings; the block outputs at their positions are dropped after the last
block, so the ViT's own pooling and final norm see the usual tokens. `strategy.deep=true` (VPT-deep)
replaces them with fresh tokens at the input of every later block. Defaults from the official code
(github.com/KMnP/vpt, src/configs/config.py): 5 tokens, shallow, prompt dropout 0, tokens drawn
uniformly from ±√(6 / (3·patch area + width)) (its "xavier uniform"). Departure: the official code
also puts the frozen body in eval mode while training (no dropout inside it); here the body's dropout
runs as in every other strategy.

Text: the tokens are prepended to the input embeddings (word embeddings looked up from the frozen
table), the attention mask grows by as many ones, and the encoder's outputs at those positions are
dropped before pooling. They are initialised from the embeddings of randomly drawn vocabulary tokens,
Lester et al.'s best initialisation ("sampled vocab"; they draw from the 5,000 most frequent tokens,
here from the whole vocabulary). As with peft's prompt tuning of encoders, the real tokens' positions
shift by `num_tokens`. `deep=true` applies VPT-deep's replacement at every later layer.

With the prompts removed the model is exactly the pretrained one; they are not part of a backbone, so
`export` writes the pretrained body and says so.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.peft.additions import Added, add_modules, first_output, replace_first
from transfer_cli.strategies.peft.shared import PeftStrategy, not_in_the_backbone

SUPPORTED = "timm VisionTransformer models (vit_*, deit_*, test_vit) and Hugging Face BERT-like text encoders"


class Prompt(Added):
    """`tokens` (num_tokens × width) placed at positions start .. start+num_tokens of a token sequence."""

    def __init__(self, target: str, tokens: torch.Tensor, start: int, dropout: float):
        super().__init__(target)
        self.tokens = nn.Parameter(tokens)
        self.start = start
        self.dropout = nn.Dropout(dropout)

    def batch(self, like: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.tokens).to(like.dtype).expand(like.shape[0], -1, -1)

    def insert(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.start], self.batch(x), x[:, self.start:]], dim=1)

    def replace(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.start], self.batch(x), x[:, self.start + len(self.tokens):]], dim=1)

    def remove(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :self.start], x[:, self.start + len(self.tokens):]], dim=1)


class BlockPrompt(Prompt):
    """Prompt tokens at the input of one block: inserted before the first block (and removed after the last)
    or, deep, replacing the previous block's outputs at those positions."""

    def __init__(self, target: str, tokens: torch.Tensor, start: int, dropout: float, block: str,
                 last_block: str | None = None):
        super().__init__(target, tokens, start, dropout)
        self.block, self.last_block = block, last_block

    def attach(self, model: TransferModel) -> None:
        self.keep(model.get_submodule(self.block).register_forward_pre_hook(self.before, with_kwargs=True))
        if self.last_block:
            self.keep(model.get_submodule(self.last_block).register_forward_hook(self.after))

    def before(self, _block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        change = self.insert if self.last_block else self.replace
        if args:
            return (change(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}

    def after(self, _block: nn.Module, _args: tuple, output: Any) -> Any:
        return replace_first(output, self.remove(first_output(output)))


class TextPrompt(Prompt):
    """Soft tokens before a Hugging Face encoder's input embeddings; its outputs there dropped."""

    def attach(self, model: TransferModel) -> None:
        body = model.body
        self.keep(body.register_forward_pre_hook(self.before, with_kwargs=True))
        self.keep(body.register_forward_hook(self.after))

    def before(self, body: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids", None)
        if ids is None:
            raise TransferCliError("prompt tuning needs the encoder called with input_ids=")
        limit = getattr(body.config, "max_position_embeddings", None)
        if limit is not None and ids.shape[1] + len(self.tokens) > limit:
            raise TransferCliError(f"{ids.shape[1]} tokens + strategy.num_tokens={len(self.tokens)} prompt tokens "
                                   f"exceed the encoder's {limit} positions; lower data.max_length")
        embeds = body.get_input_embeddings()(ids)
        kwargs["inputs_embeds"] = self.insert(embeds)
        n = len(self.tokens)
        for key, fill in (("attention_mask", 1), ("token_type_ids", 0)):
            if kwargs.get(key) is not None:
                value = kwargs[key]
                kwargs[key] = torch.cat([value.new_full((value.shape[0], n), fill), value], dim=1)
        return args, kwargs

    def after(self, _body: nn.Module, _args: tuple, output: Any) -> Any:
        output.last_hidden_state = self.remove(output.last_hidden_state)
        return output


def image_prompts(model: TransferModel, num_tokens: int, deep: bool, dropout: float) -> list[Prompt]:
    body = model.body
    width, start = body.embed_dim, body.num_prefix_tokens
    bound = math.sqrt(6.0 / (3 * math.prod(body.patch_embed.patch_size) + width))
    blocks = [f"body.blocks.{i}" for i in range(len(body.blocks))]

    def tokens() -> torch.Tensor:
        return torch.empty(num_tokens, width).uniform_(-bound, bound)

    first = BlockPrompt("body.patch_embed", tokens(), start, dropout, blocks[0], last_block=blocks[-1])
    return [first, *(BlockPrompt(b, tokens(), start, dropout, b) for b in blocks[1:] if deep)]


def text_prompts(model: TransferModel, num_tokens: int, deep: bool, dropout: float) -> list[Prompt]:
    lookup = model.body.get_input_embeddings()
    table = lookup.weight

    def tokens() -> torch.Tensor:  # embeddings of randomly drawn vocabulary tokens
        return table[torch.randint(len(table), (num_tokens,))].detach().clone()

    lookup_name = next(n for n, m in model.body.named_modules() if m is lookup)
    first = TextPrompt(f"body.{lookup_name}", tokens(), 0, dropout)
    return [first, *(BlockPrompt(b, tokens(), 0, dropout, b) for b, _ in model.blocks()[1:] if deep)]


@STRATEGIES.register("vpt")
class PromptTuning(PeftStrategy):
    """Learnable prompt tokens (VPT shallow/deep on timm ViTs, prompt tuning on text encoders); body frozen."""

    export_caveat = not_in_the_backbone("prompts")

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        if int(cfg.num_tokens) < 1:
            raise TransferCliError(f"strategy.num_tokens={cfg.num_tokens} must be at least 1")

    def adapt(self, model: TransferModel) -> dict[str, str]:
        from timm.models.vision_transformer import VisionTransformer

        settings = (int(self.cfg.num_tokens), bool(self.cfg.deep), float(self.cfg.dropout))
        if isinstance(model.body, VisionTransformer) and isinstance(model.body.blocks, nn.Sequential):
            prompts = image_prompts(model, *settings)
        elif model.modality == "text" and hasattr(model.body, "get_input_embeddings"):
            prompts = text_prompts(model, *settings)
        else:
            raise TransferCliError(f"strategy=vpt cannot prompt a {type(model.body).__name__}; it supports {SUPPORTED}")
        return add_modules(model, prompts)
