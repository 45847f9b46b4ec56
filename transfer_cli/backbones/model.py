"""TransferModel: a pretrained body plus a new head, seen as named layer groups.

Every strategy works on group names (`stem`, `layer1`, ..., `head` for a ResNet; `embeddings`,
`layer.0`, ..., `head` for BERT), never on the body's own module layout, so the same schedule or
regulariser runs on timm CNNs, timm ViTs and Hugging Face encoders.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Sequence, Union

import torch
from torch import nn

from transfer_cli.errors import TransferCliError

Batch = Mapping[str, torch.Tensor]

HEAD = "head"

#: What a group is made of: whole modules, or parameters that belong to no submodule of their own
#: (a ViT's cls_token and pos_embed are bare parameters of the body).
Member = Union[nn.Module, nn.Parameter]


@dataclass(frozen=True)
class LayerGroup:
    """A named, ordered slice of the model: the unit that is frozen, thawed or given its own rate.

    `modules` are the group's modules in forward order (BatchNorm freezing and feature-map hooks use
    them); `parameter_names` are all its parameters, bare ones included, relative to the model.
    """

    name: str
    modules: tuple[nn.Module, ...]
    parameter_names: tuple[str, ...]

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        params = dict(model.named_parameters())
        return [params[n] for n in self.parameter_names]


class TransferModel(nn.Module):
    """Body + head with named groups, blocks and feature maps.

    Subclasses (one per backbone family) implement `features` (body -> pooled features) and
    `inputs` (which batch keys the body reads); the grouping is computed once by the builder and
    passed in, so this class stays family-agnostic.

    Args:
        body: the pretrained network without its source classifier.
        head: the new classifier for the target classes.
        group_modules: ordered group name -> members of the body in that group (input to output):
            modules, or bare parameters (`Member`); see `group_members` to derive them.
        block_names: dotted names (relative to the model) of the routable residual/transformer blocks.
        feature_dim: width of the pooled features the head reads.
        modality: "image" or "text"; decides which preprocessor builds batches.
        preprocessing: the backbone's own data config (image size, mean, std, interpolation, crop) or
            {"tokenizer": ...} for text.
        source_classifier: the pretrained model's own classifier ({"weight", "bias"}), when its weights
            had one; see `source_head`.
    """

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        group_modules: Mapping[str, Sequence[Member]],
        block_names: Sequence[str],
        feature_dim: int,
        modality: str,
        preprocessing: Mapping[str, Any],
        source_classifier: Mapping[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.body = body
        self.head = head
        self.feature_dim = feature_dim
        self.modality = modality
        self.preprocessing = dict(preprocessing)
        self._block_names = tuple(block_names)
        self._source_classifier = {k: v.detach().clone() for k, v in (source_classifier or {}).items()}
        self._frozen_bn: set[str] = set()
        #: where the body's weights came from (backbones/origin.py); the builder that loaded them sets it
        self.weights_origin: dict[str, Any] = {"source": "unknown"}
        if HEAD in group_modules:
            raise ValueError(f"group name {HEAD!r} is reserved for the new classifier; rename the body's group")
        module_to_name = {id(m): n for n, m in self.named_modules()}
        param_to_name = {id(p): n for n, p in self.named_parameters()}
        # each group as the dotted paths of its members, so that `regroup` finds what sits there later
        self._member_paths = {name: [module_to_name[id(m)] if isinstance(m, nn.Module) else param_to_name[id(m)]
                                     for m in members] for name, members in {**group_modules, HEAD: [head]}.items()}
        self._adopted: dict[str, str] = {}
        self._groups = self._index_groups()

    # ---- groups -----------------------------------------------------------------------------
    def _index_groups(self) -> dict[str, LayerGroup]:
        modules, params = dict(self.named_modules()), dict(self.named_parameters())
        param_owner: dict[str, str] = {}  # parameter name -> group, in group order
        members: dict[str, list[nn.Module]] = {}
        for group_name, paths in self._member_paths.items():
            members[group_name] = []
            for path in paths:
                if path in params:  # a bare parameter
                    member_names = [path]
                else:
                    members[group_name].append(modules[path])
                    member_names = [f"{path}.{p}" if path else p for p, _ in modules[path].named_parameters()]
                for full in member_names:
                    if full in param_owner:
                        raise ValueError(f"parameter {full} is in groups {param_owner[full]} and {group_name}")
                    param_owner[full] = group_name
        for name, module in self._adopted.items():
            owner = next((group for n, group in param_owner.items() if n.startswith(f"{module}.")), None)
            if owner is None:
                raise ValueError(f"parameter {name} adapts {module}, which holds no parameter of any layer group")
            param_owner[name] = owner
        orphans = [n for n in params if n not in param_owner]
        if orphans:
            raise ValueError(f"parameters outside every layer group: {orphans[:5]}")
        return {name: LayerGroup(name, tuple(group_members), tuple(n for n, g in param_owner.items() if g == name))
                for name, group_members in members.items()}

    def regroup(self, adopted: Mapping[str, str] | None = None) -> None:
        """Index the groups again after a strategy changed the model, so that rates, freezing and hooks follow.

        Each group keeps the members at the paths it was built from, whatever sits there now: a layer that
        LoRA wrapped brings its new parameters into the group. `adopted` places parameters that live outside
        every group's modules (an adapter beside the body): parameter name -> the module it adapts, whose
        group takes it, so discriminative rates (`optim.layer_decay`) treat it as part of that layer.
        """
        self._adopted.update(adopted or {})
        self._groups = self._index_groups()

    def groups(self) -> list[LayerGroup]:
        """The ordered layer groups, input to output; the last is always `head`."""
        return list(self._groups.values())

    def group_names(self) -> list[str]:
        return list(self._groups)

    def group(self, name: str) -> LayerGroup:
        if name not in self._groups:
            raise TransferCliError(f"unknown layer group {name!r}; this model has: {', '.join(self._groups)}")
        return self._groups[name]

    def body_group_names(self) -> list[str]:
        return [n for n in self._groups if n != HEAD]

    def set_trainable(self, name: str, trainable: bool, freeze_bn: bool = True) -> None:
        """Freeze or thaw one group; a frozen group's BatchNorm statistics are frozen too unless told otherwise."""
        group = self.group(name)
        for p in group.parameters(self):
            p.requires_grad_(trainable)
        if trainable or not freeze_bn:
            self._frozen_bn.discard(name)
        else:
            self._frozen_bn.add(name)
        self.train(self.training)

    def is_trainable(self, name: str) -> bool:
        return any(p.requires_grad for p in self.group(name).parameters(self))

    def trainable_group_names(self) -> list[str]:
        return [n for n in self._groups if self.is_trainable(n)]

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode:
            for name in self._frozen_bn:
                for module in self._groups[name].modules:
                    for m in module.modules():
                        if isinstance(m, nn.modules.batchnorm._BatchNorm):
                            m.eval()
        return self

    # ---- the source task ---------------------------------------------------------------------
    def source_head(self) -> nn.Linear | None:
        """A new copy of the source model's classifier on the features (e.g. its 1000 ImageNet classes),
        or None when the weights had none (random init, a text encoder, an exported body).

        It is not part of the model: no group, no parameter count, not in checkpoints, so every
        strategy that ignores the source task is unaffected. A method that needs the source task's
        outputs (Co-Tuning's relationship, LwF's distillation) takes this copy in `setup` and owns it
        (trains it, or keeps it frozen, and saves it in its own state).
        """
        if not self._source_classifier:
            return None
        weight = self._source_classifier["weight"]
        bias = self._source_classifier.get("bias")
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        head.load_state_dict(self._source_classifier)
        return head.to(next(self.head.parameters()).device)

    # ---- blocks and feature maps -------------------------------------------------------------
    def blocks(self) -> list[tuple[str, nn.Module]]:
        """The routable residual / transformer blocks, input to output, by dotted name."""
        return [(n, self.get_submodule(n)) for n in self._block_names]

    def feature_maps(self, batch: Batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Run the model and return the output of each named group (its last module), by hook."""
        outputs: dict[str, torch.Tensor] = {}
        handles = [self._capture(n, outputs) for n in names]
        try:
            self(batch)
        finally:
            for h in handles:
                h.remove()
        return outputs

    def _capture(self, name: str, store: dict, stop: bool = False) -> Any:
        module = self.group(name).modules[-1]

        def hook(_module, _inputs, output):
            store[name] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _StopForward

        return module.register_forward_hook(hook)

    # ---- running part of the model (feature caching) -----------------------------------------
    def group_output(self, batch: Batch, name: str) -> torch.Tensor:
        """The output of group `name`, without running the layers after it."""
        outputs: dict[str, torch.Tensor] = {}
        handle = self._capture(name, outputs, stop=True)
        try:
            self(batch)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return outputs[name]

    def forward_from(self, names: Sequence[str], output: torch.Tensor) -> torch.Tensor:
        """The logits when the bottom groups `names` are known to produce `output` (e.g. cached).

        Their modules are skipped, each returning `output`, so a body that chains its groups one after
        the other (a ResNet) runs only the groups above. A body that does more between its groups (a
        ViT adds the class token after the patch embedding) gives wrong results or fails: callers
        check the result against `forward` once before trusting it.
        """
        modules = [m for name in names for m in self.group(name).modules]
        for module in modules:
            module.forward = lambda *args, **kwargs: output
        try:
            return self(_AnyKey(output))
        finally:
            for module in modules:
                del module.forward

    def runs_from(self, names: Sequence[str], batch: Batch) -> bool:
        """Whether `forward_from(names, ...)` on the output of the last of `names` gives this batch's logits:
        true for a body that only chains its groups (a ResNet), false for one that does more between them.
        Compared in eval mode, which changes no statistics."""
        was_training = self.training
        self.eval()
        try:
            expected = self(batch)
            got = self.forward_from(names, self.group_output(batch, names[-1]))
            return got.shape == expected.shape and torch.allclose(got.float(), expected.float(), rtol=1e-4, atol=1e-5)
        except Exception:  # noqa: BLE001 - any failure means this body cannot run from that group
            return False
        finally:
            self.train(was_training)

    # ---- forward -----------------------------------------------------------------------------
    def features(self, batch: Batch) -> torch.Tensor:
        """Pooled penultimate features (what the head reads)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.features(batch))


class _StopForward(Exception):
    """Ends a forward pass from a hook once the wanted output exists."""


class _AnyKey(Mapping):
    """A stand-in batch that gives `value` for every key: the skipped input layers ignore what they get."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.value

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0


def group_members(body: nn.Module, owner: Mapping[str, Hashable]) -> dict[Hashable, list[tuple[str, Member]]]:
    """Turn "parameter name -> group" into each group's members, as (dotted path, member) pairs.

    A group gets the largest submodules whose parameters are all its own, and bare parameters where
    a module's parameters are split between groups. A parameter-free module (activation, pooling,
    dropout) between two siblings with parameters goes to the group before it, so the group's last
    module is where its output leaves (a ResNet stem ends after its max-pool, a ViT stem after the
    position embedding); parameter-free modules after the last such sibling (global pool, identity
    classifier) belong to no group. Groups and members come in registration order, which is
    forward order in timm and Hugging Face models.
    """
    members: dict[Hashable, list[tuple[str, Member]]] = {g: [] for g in dict.fromkeys(owner.values())}

    def walk(module: nn.Module, prefix: str) -> None:
        for name, param in module.named_parameters(recurse=False):
            members[owner[prefix + name]].append((prefix + name, param))
        previous, pending = None, []
        for name, child in module.named_children():
            path = prefix + name
            names = [f"{path}.{n}" for n, _ in child.named_parameters()]
            if not names:
                pending.append((path, child))
                continue
            if previous is not None:
                members[previous].extend(pending)
            pending = []
            owners = {owner[n] for n in names}
            if len(owners) == 1:
                members[owners.pop()].append((path, child))
            else:
                walk(child, path + ".")
            previous = owner[names[-1]]

    walk(body, "")
    return members
