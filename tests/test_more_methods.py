"""Co-Tuning, LwF, StochNorm, Bi-Tuning, Hybrid Forward and L2T-ww: the spec's properties on hand-checkable
models (weight 0 is fine-tuning, frozen copies never change, each formula against a hand computation,
L2T-ww's meta-gradient against finite differences), exact resume, and the refusals."""
import copy

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from transfer_cli.engine.loop import StrategyStep, Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.regularizers.bi_tuning import ClassQueues, queue_contrast
from transfer_cli.strategies.regularizers.co_tuning import category_relationship
from transfer_cli.strategies.regularizers.hybrid_forward import HybridForward
from transfer_cli.strategies.regularizers.l2t_ww_meta import MetaNetworks, matching_loss, pair_errors
from transfer_cli.strategies.regularizers.lwf import distillation_loss
from transfer_cli.strategies.regularizers.stochnorm import convert_batchnorms
from tests.test_loop import CrashingLoader
from tests.toy import ToyChain, ToyLoader, ToyModel, toy_config

SOURCE_CLASSES = 4
TERMS = {
    "co_tuning": {"weight": 2.3},
    "lwf": {"weight": 4.0, "temperature": 3.0},
    "stochnorm": {"p": 0.5},
    "bi_tuning": {"weight": 1.0, "projection_dim": 8, "queue_size": 4, "momentum": 0.9, "temperature": 0.07,
                  "key_view": "auto"},
    "hybrid_forward": {"weight": 1.0},
    "l2t_ww": {"beta": 0.5, "layers": None, "pairs": None, "where_init": 1.0, "lookahead_steps": 2, "meta_lr": 1e-2,
               "meta_weight_decay": 1e-4, "meta_every": 1, "target_init": "pretrained"},
}
#: the setting that makes each method plain fine-tuning
OFF = {"co_tuning": {"weight": 0.0}, "lwf": {"weight": 0.0}, "stochnorm": {"p": 1.0}, "bi_tuning": {"weight": 0.0},
       "hybrid_forward": {"weight": 0.0}, "l2t_ww": {"beta": 0.0}}


def toy(name: str) -> torch.nn.Module:
    """The toy each method runs on: Hybrid Forward needs blocks to alternate, L2T-ww layers to pair."""
    if name == "hybrid_forward":
        return ToyChain()
    return ToyModel(source_classes=SOURCE_CLASSES)


def config(name: str, overrides=None, **trainer):
    cfg = toy_config(**trainer)
    cfg.strategy = OmegaConf.create({"name": name, **TERMS.get(name, {}), **(overrides or {})})
    return cfg


def fit(tmp_path, cfg, model, loader=None):
    trainer = Trainer(model, build_strategy(cfg), loader or ToyLoader(), ToyLoader(shuffle=False),
                      ToyLoader(shuffle=False), cfg, tmp_path)
    return trainer, trainer.fit()


def body_state(model):
    return {k: v for k, v in model.state_dict().items() if k.startswith(("body.", "head."))}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_the_off_setting_is_exactly_fine_tuning(tmp_path, name):
    torch.manual_seed(0)
    reference = toy(name)
    torch.manual_seed(0)
    model = toy(name)
    _, finetune = fit(tmp_path / "f", config("finetune"), reference)
    _, off = fit(tmp_path / "m", config(name, OFF[name]), model)
    assert off.test == finetune.test
    assert same(body_state(model), body_state(reference))


@pytest.mark.parametrize("name", sorted(TERMS))
def test_each_method_resumes_exactly(tmp_path, name):
    torch.manual_seed(0)
    model_a = toy(name)
    _, a = fit(tmp_path / "a", config(name, max_epochs=4), model_a)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", config(name, max_epochs=4), toy(name), loader=CrashingLoader(2))
    torch.manual_seed(123)  # rebuilt from other weights: what the method keeps must come from the checkpoint
    model_b = toy(name)
    trainer, b = fit(tmp_path / "b", config(name, max_epochs=4, resume=True), model_b)
    assert b.test == a.test
    assert same(model_a.state_dict(), model_b.state_dict())


@pytest.mark.parametrize("name, frozen", [("hybrid_forward", "teacher"), ("l2t_ww", "source"), ("lwf", "head"),
                                          ("bi_tuning", "key")])
def test_the_frozen_copy_never_changes_by_gradient(tmp_path, name, frozen):
    torch.manual_seed(0)
    model = toy(name)
    start = copy.deepcopy(model)
    trainer, _ = fit(tmp_path, config(name), model)
    term = trainer.strategy.regularizer(name)
    copy_ = getattr(term, frozen)
    assert all(not p.requires_grad and p.grad is None for p in copy_.parameters())
    if name == "bi_tuning":  # the key encoder moves only by the momentum rule (checked below)
        return
    reference = {"teacher": lambda: torch.nn.ModuleList([b for _, b in start.blocks()]),
                 "source": lambda: start, "head": start.source_head}[frozen]()
    assert same(copy_.state_dict(), reference.state_dict())


# ---- Co-Tuning ----------------------------------------------------------------------------------
def test_co_tuning_relationship_rows_are_mean_source_distributions_that_sum_to_one(tmp_path):
    probabilities = F.softmax(torch.randn(7, 5), dim=1)
    labels = torch.tensor([0, 2, 2, 0, 0, 2, 2])
    rows = category_relationship(probabilities, labels, 3)
    torch.testing.assert_close(rows[0], probabilities[labels == 0].mean(0))
    torch.testing.assert_close(rows[2], probabilities[labels == 2].mean(0))
    torch.testing.assert_close(rows[1], torch.full((5,), 0.2))  # no example: uniform
    torch.testing.assert_close(rows.sum(1), torch.ones(3))

    torch.manual_seed(0)
    model = ToyModel(source_classes=SOURCE_CLASSES)
    source = model.source_head()
    strategy = build_strategy(config("co_tuning"))
    strategy.setup(model, ToyLoader(), torch.device("cpu"))
    relationship = strategy.regularizer("co_tuning").relationship
    model.eval()
    loader = ToyLoader(shuffle=False)
    with torch.no_grad():
        p = torch.cat([F.softmax(source(model.features(b)), 1) for b in loader])
    torch.testing.assert_close(relationship, category_relationship(p, loader.labels, 3))
    torch.testing.assert_close(relationship.sum(1), torch.ones(3))


def test_co_tuning_trains_the_source_head_with_its_loss(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(source_classes=SOURCE_CLASSES)
    before = model.source_head().weight.detach().clone()
    trainer, _ = fit(tmp_path, config("co_tuning"), model)
    assert "co_tuning_source_head" in [g["name"] for g in trainer.optimizer.param_groups]
    assert not torch.equal(model.term_co_tuning.weight, before)
    batch = next(iter(ToyLoader()))
    model.train()
    step = StrategyStep(model, trainer.strategy, trainer.strategy.forward, [])
    _, penalties = step(batch)
    targets = trainer.strategy.regularizer("co_tuning").relationship[batch["labels"]]
    expected = -(targets * F.log_softmax(model.term_co_tuning(model.features(batch)), 1)).sum(1).mean()
    assert penalties["co_tuning"].item() == pytest.approx(2.3 * expected.item(), rel=1e-5)


def test_co_tuning_and_lwf_refuse_a_backbone_without_its_source_classifier():
    for name in ("co_tuning", "lwf"):
        strategy = build_strategy(config(name))
        with pytest.raises(TransferCliError, match="co_tuning and lwf do"):
            strategy.setup(ToyModel(), ToyLoader(), torch.device("cpu"))


# ---- LwF ----------------------------------------------------------------------------------------
def test_lwf_distils_the_outputs_stored_before_training_at_each_examples_position(tmp_path):
    student, teacher = torch.randn(5, 4), torch.randn(5, 4)
    expected = (F.softmax(teacher / 3, 1) * (F.log_softmax(teacher / 3, 1) - F.log_softmax(student / 3, 1))).sum(1).mean()
    assert distillation_loss(student, teacher, 3.0).item() == pytest.approx(expected.item(), rel=1e-5)

    torch.manual_seed(0)
    model = ToyModel(source_classes=SOURCE_CLASSES)
    pretrained = copy.deepcopy(model).eval()
    trainer, _ = fit(tmp_path, config("lwf", max_epochs=2), model)
    term = trainer.strategy.regularizer("lwf")
    with torch.no_grad():
        stored = torch.cat([pretrained.source_head()(pretrained.features(b)) for b in ToyLoader(shuffle=False)])
    torch.testing.assert_close(term.source_logits, stored)
    trainer.train_loader.set_epoch(0)
    batch = next(iter(trainer.train_loader))  # the wrapped loader names each batch's examples
    order = next(ToyLoader().batch_indices())
    assert torch.equal(batch["example_index"], order)
    model.train()
    _, penalties = StrategyStep(model, trainer.strategy, trainer.strategy.forward, [])(batch)
    current = term.head(model.features(batch))
    assert penalties["lwf"].item() == pytest.approx(4.0 * distillation_loss(current, stored[order], 3.0).item(),
                                                     rel=1e-5)


# ---- StochNorm ----------------------------------------------------------------------------------
def test_stochnorm_picks_batch_or_moving_statistics_per_channel():
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(6)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.5, 2)
    plain = copy.deepcopy(norm)
    convert_batchnorms(norm, 0.5)
    x = torch.randn(4, 6, 3, 3)
    moving = F.batch_norm(x, plain.running_mean.clone(), plain.running_var.clone(), plain.weight, plain.bias, False)
    torch.manual_seed(1)
    out = norm(x)
    batch = plain(x)  # ordinary BatchNorm in training: batch statistics, and it updates the moving ones
    torch.manual_seed(1)
    use_batch = torch.rand(1, 6, 1, 1) < 0.5
    assert 0 < use_batch.sum() < 6
    torch.testing.assert_close(out, torch.where(use_batch, batch, moving))
    torch.testing.assert_close(norm.running_mean, plain.running_mean)  # updated every step, as BatchNorm
    norm.eval(), plain.eval()
    torch.testing.assert_close(norm(x), plain(x))


def test_stochnorm_evaluation_does_not_depend_on_p():
    torch.manual_seed(0)
    a = ToyModel()
    b = copy.deepcopy(a)
    convert_batchnorms(a, 0.1), convert_batchnorms(b, 0.9)
    batch = next(iter(ToyLoader()))
    a.eval(), b.eval()
    assert torch.equal(a(batch), b(batch))


def test_stochnorm_refuses_a_backbone_without_batchnorm():
    strategy = build_strategy(config("stochnorm"))
    model = ToyModel()
    for name, module in list(model.body.named_modules()):
        if isinstance(module, torch.nn.BatchNorm2d):
            parent, _, leaf = name.rpartition(".")
            setattr(model.body.get_submodule(parent), leaf, torch.nn.Identity())
    with pytest.raises(TransferCliError, match="this backbone has none"):
        strategy.setup(model, ToyLoader(), torch.device("cpu"))


# ---- Bi-Tuning ----------------------------------------------------------------------------------
def test_bi_tuning_key_encoder_gets_no_gradient_and_follows_the_momentum_rule(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    strategy = build_strategy(config("bi_tuning"))
    strategy.setup(model, ToyLoader(), torch.device("cpu"))
    term = strategy.regularizer("bi_tuning")
    key_before = {n: p.detach().clone() for n, p in term.key.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    model.train()
    _, penalties = StrategyStep(model, strategy, strategy.forward, [])(next(iter(ToyLoader())))
    sum(penalties.values()).backward()
    assert all(p.grad is None and not p.requires_grad for p in term.key.parameters())
    assert model.term_bi_tuning.weight.grad is not None  # the projector learns
    query = dict(model.named_parameters())
    for name, p in term.key.named_parameters():
        own = query[name[len("model."):]] if name.startswith("model.") else dict(term.projector.named_parameters())[
            name[len("projector."):]]
        torch.testing.assert_close(p, 0.9 * key_before[name] + 0.1 * own.detach())


def test_bi_tuning_contrast_and_queues_match_a_one_example_at_a_time_loop():
    torch.manual_seed(0)
    classes, size, dim = 3, 4, 5
    queues = ClassQueues(dim - 1, dim, classes, size)
    reference = copy.deepcopy(queues)
    labels = torch.tensor([2, 0, 2, 2, 2, 2, 1])  # class 2 more often than the queue holds
    keys = F.normalize(torch.randn(7, dim), dim=1)
    queries = F.normalize(torch.randn(7, dim), dim=1)
    queued = queues.projections.flatten(1)
    got = queue_contrast((queries * keys).sum(1), queries @ queued, labels, size, 0.07)
    losses = []
    for i, c in enumerate(labels.tolist()):  # TLlib's per-example construction: own key, class c's, the rest
        q = queries[i]
        positives = q @ queues.projections[:, c, :]
        negatives = torch.cat([q @ queues.projections[:, k, :] for k in range(classes) if k != c])
        log_p = F.log_softmax(torch.cat([(q * keys[i]).sum().view(1), positives, negatives]) / 0.07, 0)
        target = torch.cat([torch.full((size + 1,), 1 / (size + 1)), torch.zeros(negatives.numel())])
        losses.append(F.kl_div(log_p, target, reduction="sum"))
        ptr = int(reference.pointer[c])
        reference.features[:, c, ptr] = keys[i]
        reference.projections[:, c, ptr] = keys[i]
        reference.pointer[c] = (ptr + 1) % size
    assert got.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    queues.push(keys, keys, labels)
    assert torch.equal(queues.projections, reference.projections)
    assert torch.equal(queues.features, reference.features)
    assert torch.equal(queues.pointer, reference.pointer)


# ---- Hybrid Forward -----------------------------------------------------------------------------
def test_hybrid_paths_equal_a_hand_built_alternation_of_student_and_teacher_blocks():
    torch.manual_seed(0)
    model = ToyChain(blocks=3)
    term = HybridForward("hybrid_forward", OmegaConf.create({"weight": 1.0}))
    term.setup(model, ToyLoader(), torch.device("cpu"))
    with torch.no_grad():  # the student moves away from the teacher
        for p in model.body.blocks.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.eval()
    batch = next(iter(ToyLoader()))
    student, teacher = list(model.body.blocks), list(term.teacher)

    def by_hand(pattern):
        x = model.body.stem(batch["pixel_values"])
        for i, who in enumerate(pattern):
            x = x + (teacher[i] if who == "T" else student[i])(x)
        return model.head(x.mean(dim=(2, 3)))

    torch.testing.assert_close(term.hybrid_logits(model, batch, "a"), by_hand("STS"))
    torch.testing.assert_close(term.hybrid_logits(model, batch, "b"), by_hand("TST"))
    torch.testing.assert_close(model(batch), by_hand("SSS"))  # the blocks are given back


def test_hybrid_forward_balances_each_path_to_the_student_loss_and_keeps_running_statistics(tmp_path):
    torch.manual_seed(0)
    model = ToyChain()
    strategy = build_strategy(config("hybrid_forward", {"weight": 0.5}))
    strategy.setup(model, ToyLoader(), torch.device("cpu"))
    term = strategy.regularizer("hybrid_forward")
    model.train()
    batch = next(iter(ToyLoader()))
    logits = model(batch)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    value = strategy.penalty(model, batch, logits)["hybrid_forward"]
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items() if "running" in k)
    student = F.cross_entropy(logits, batch["labels"])
    assert value.item() == pytest.approx(0.5 * student.item(), rel=1e-5)  # each weighted path counts as the task
    value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    paths = [F.cross_entropy(term.hybrid_logits(model, batch, p), batch["labels"]) for p in "ab"]
    (0.5 * sum((student / h).detach() * h for h in paths) / 2).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(grads[n], p.grad)
    stats = term.epoch_stats()
    assert set(stats) == {"hybrid_forward/ce_student", "hybrid_forward/ce_path_a", "hybrid_forward/ce_path_b"}


def test_hybrid_forward_refuses_a_model_with_one_block():
    strategy = build_strategy(config("hybrid_forward"))
    with pytest.raises(TransferCliError, match="at least 2"):
        strategy.setup(ToyModel(), ToyLoader(), torch.device("cpu"))


# ---- L2T-ww -------------------------------------------------------------------------------------
def test_l2t_ww_what_starts_uniform_where_is_relu6_and_uniform_unit_weights_give_the_hint_loss():
    torch.manual_seed(0)
    meta = MetaNetworks([6], where_init=1.0)
    source = torch.randn(5, 6, 4, 4)
    what, where = meta([source])
    torch.testing.assert_close(what[0], torch.full((5, 6), 1 / 6))
    assert bool(((where[0] >= 0) & (where[0] <= 6)).all())
    with torch.no_grad():
        meta.where[0].bias.fill_(100.0)
    assert torch.equal(meta([source])[1][0], torch.full((5, 1), 6.0))
    target = torch.randn(5, 3, 2, 2)
    weight, bias = torch.randn(6, 3), torch.randn(6)
    errors = pair_errors(source, target, weight, bias)
    hint = F.conv2d(target, weight.view(6, 3, 1, 1), bias)
    resized = F.interpolate(source, size=(2, 2), mode="bilinear", align_corners=False)
    fitnets = F.mse_loss(hint, resized)  # FitNets' hint loss with a 1×1 regressor
    loss = matching_loss([errors], [torch.full((5, 6), 1 / 6)], [torch.ones(5, 1)], beta=0.5)
    assert loss.item() == pytest.approx(0.5 * fitnets.item(), rel=1e-5)


def test_l2t_ww_meta_gradient_equals_a_finite_difference_estimate():
    torch.manual_seed(0)
    model = ToyModel(width=3).double()
    loader = ToyLoader(n=8)
    loader.images = loader.images.double()
    cfg = config("l2t_ww", {"meta_every": 0})
    cfg.optim.lr, cfg.optim.weight_decay = 0.5, 0.01
    strategy = build_strategy(cfg)
    strategy.setup(model, loader, torch.device("cpu"))
    term = strategy.regularizer("l2t_ww")
    term.meta.double()
    with torch.no_grad():  # away from the zero init, so the "what" weights matter too
        for p in term.meta.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.train()
    batch = next(iter(loader))
    optimizer = torch.optim.SGD([{"params": [p for p in model.parameters() if p.requires_grad], "lr": 0.5}],
                                momentum=0.9, weight_decay=0.01)
    logits, penalties = StrategyStep(model, strategy, strategy.forward, [])(batch)  # a real step first
    (F.cross_entropy(logits, batch["labels"]) + sum(penalties.values())).backward()
    optimizer.step()
    sources = term.source.feature_maps(batch, sorted({s for s, _ in term.pairs}))
    analytic = term.meta_gradient(model, batch, sources, optimizer)
    params = list(term.meta.parameters())
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]

        def outer(eps):
            with torch.no_grad():
                for p, d in zip(params, direction):
                    p.add_(eps * d)
            try:
                what, where = term.meta([sources[s] for s, _ in term.pairs])
                names = {id(p): n for n, p in model.named_parameters()}
                weights = [(names[id(p)], p, g, optimizer.state[p].get("momentum_buffer"))
                           for g in optimizer.param_groups for p in g["params"]]
                return term.look_ahead.outer_loss(batch, sources, what, where, weights, 2).item()
            finally:
                with torch.no_grad():
                    for p, d in zip(params, direction):
                        p.sub_(eps * d)

        eps = 1e-5
        numeric = (outer(eps) - outer(-eps)) / (2 * eps)
        exact = sum((g * d).sum() for g, d in zip(analytic, direction) if g is not None).item()
        assert exact == pytest.approx(numeric, rel=1e-4, abs=1e-9)
        assert abs(exact) > 1e-6


def test_l2t_ww_updates_the_meta_networks_but_keeps_the_real_steps_weights(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    cfg = config("l2t_ww")
    strategy = build_strategy(cfg)
    trainer = Trainer(model, strategy, ToyLoader(), ToyLoader(shuffle=False), ToyLoader(shuffle=False), cfg, tmp_path)
    trainer.prepare()
    trainer.begin_epoch(0)
    model.train()
    term = strategy.regularizer("l2t_ww")
    meta_before = copy.deepcopy(term.meta.state_dict())
    batch = next(iter(trainer.train_loader))
    original = term.on_step_end
    after_step = {}

    def spy(model_, batch_, optimizer_):
        after_step.update({k: v.clone() for k, v in model_.state_dict().items()})
        original(model_, batch_, optimizer_)

    term.on_step_end = spy
    from transfer_cli.engine.loop import TrainState
    trainer.train_step(batch, TrainState())
    assert same(after_step, model.state_dict())  # the look-ahead left weights and statistics as the step did
    assert not same(meta_before, term.meta.state_dict())
    assert len(term.pairs) == 1 and term.pairs[0] == ("block", "block")


def test_l2t_ww_refuses_adamw(tmp_path):
    cfg = config("l2t_ww")
    cfg.optim = OmegaConf.create({"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                  "weight_decay": 0.0, "head_lr_mult": 1.0, "layer_decay": 1.0})
    with pytest.raises(TransferCliError, match="set optim=sgd"):
        fit(tmp_path, cfg, ToyModel())


def test_terms_that_run_the_raw_inputs_refuse_a_required_feature_cache():
    freeze = {"name": "freeze", "groups": 1, "bn": "freeze", "cache_features": True}
    for name in ("hybrid_forward", "bi_tuning", "l2t_ww"):
        cfg = config("finetune")
        cfg.strategy = OmegaConf.create(freeze)
        cfg.regularizers = OmegaConf.create({name: TERMS[name]})
        with pytest.raises(TransferCliError, match=f"cannot serve regularizer {name}"):
            build_strategy(cfg)
