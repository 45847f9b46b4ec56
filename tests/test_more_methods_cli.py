"""The six methods end to end through the CLI: on the quickstart's timm CNN, with a schedule, on a tiny BERT
(with and without a classification head), and the source head kept from backbones that have one."""
import json
import re

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.backbones import build_backbone
from transfer_cli.backbones.export import export_body
from transfer_cli.cli import main
from transfer_cli.overrides import compose_config
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies.regularizers.source_task import source_head

METHODS = ["co_tuning", "lwf", "stochnorm", "bi_tuning", "hybrid_forward", "l2t_ww"]
#: what each logs per epoch (stochnorm adds no loss)
LOGGED = {"co_tuning": "train_penalty/co_tuning", "lwf": "train_penalty/lwf", "stochnorm": "train_loss",
          "bi_tuning": "train_penalty/bi_tuning_projection", "hybrid_forward": "hybrid_forward/ce_path_a",
          "l2t_ww": "l2t_ww/where_mean"}
SMOKE = ["trainer=smoke", "trainer.device=cpu"]


@pytest.fixture(scope="module")
def tiny_bert_classifier(tmp_path_factory, tiny_bert):
    """The tiny BERT saved as a 3-class sequence classifier (pooler + linear head), like a fine-tuned hub model."""
    from transformers import BertForSequenceClassification, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert_classifier")
    torch.manual_seed(1)
    model = BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    model.save_pretrained(folder)
    BertTokenizerFast.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_task(tmp_path_factory):
    csv = tmp_path_factory.mktemp("text") / "train.csv"
    rows = ["text,label"] + [f"the cat sat on the mat {i},cat" for i in range(8)] + \
        [f"a dog ran fast {i},dog" for i in range(8)]
    csv.write_text("\n".join(rows) + "\n")
    return ["data=csv_text", f"data.train_file={csv}", "optim=sgd"]


def train(run_dir, *overrides):
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}", *overrides])
    return json.loads((run_dir / "results.json").read_text()), read_jsonl(run_dir / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("name", METHODS)
def test_each_method_trains_on_the_quickstart_cnn_and_eval_reproduces_it(tmp_path, name):
    results, records = train(tmp_path, f"strategy={name}")
    assert results["config"]["strategy"] == name
    assert all(LOGGED[name] in r for r in records)
    main(["eval", f"run={tmp_path}"])
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == results["test"]


@pytest.mark.slow
def test_terms_combine_with_schedules_and_each_other(tmp_path):
    _, records = train(tmp_path / "gradual", "strategy=gradual_unfreeze", "regularizers=[co_tuning,stochnorm]")
    assert [r["trainable_groups"] for r in records] == [["head"], ["layer4", "head"]]
    assert all(r["train_penalty/co_tuning"] > 0 for r in records)
    # a linear probe serves cached features; LwF still finds each example's stored outputs
    _, records = train(tmp_path / "probe", "strategy=freeze", "strategy.groups=all", "regularizers=[lwf]")
    # a KL divergence: non-negative up to float rounding (here the source head's outputs barely move)
    assert all(r["train_penalty/lwf"] >= -1e-6 for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bi_tuning", "hybrid_forward", "l2t_ww", "co_tuning", "lwf"])
def test_methods_on_a_tiny_bert_with_a_classification_head(tmp_path, name, tiny_bert_classifier, text_task):
    _, records = train(tmp_path, "backbone=hf", f"backbone.weights={tiny_bert_classifier}", *text_task,
                       f"strategy={name}")
    assert all(LOGGED[name] in r for r in records)


def refused_in_one_line(capsys, run_dir, *overrides):
    """The CLI's exit status 2 and its single error line for a run that is refused."""
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *SMOKE, f"hydra.run.dir={run_dir}", *overrides])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("transfer-cli: error: "), err
    return err[0]


@pytest.mark.slow
@pytest.mark.parametrize("name, message", [
    ("co_tuning", "co_tuning and lwf do"),  # BertModel saved without a task head
    ("stochnorm", "has none \\(LayerNorm"),
    ("bi_tuning", "key_view=augment: text has no augmentation"),
])
def test_what_does_not_apply_to_a_text_encoder_is_refused_in_one_line(tmp_path, capsys, name, message,
                                                                      tiny_bert, text_task):
    extra = ["strategy.key_view=augment"] if name == "bi_tuning" else []
    line = refused_in_one_line(capsys, tmp_path, "backbone=hf", f"backbone.weights={tiny_bert}", *text_task,
                               f"strategy={name}", *extra)
    assert re.search(message, line)


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", [
    # a routing strategy's frozen path already anchors the pretrained network
    (["strategy=spottune", "regularizers=[co_tuning]"], "strategy=spottune cannot hold regularizers \\(co_tuning\\)"),
    (["strategy=adafilter", "regularizers=[hybrid_forward]"], "strategy=adafilter cannot hold regularizers"),
    # the feature cache replaces the raw inputs these terms run a network on
    (["strategy=freeze", "strategy.groups=2", "strategy.cache_features=true", "regularizers=[hybrid_forward]"],
     "cannot serve regularizer hybrid_forward"),
    (["strategy=gradual_unfreeze", "strategy.cache_features=true", "regularizers=[bi_tuning]"],
     "cannot serve regularizer bi_tuning"),
    (["strategy=freeze", "strategy.groups=1", "strategy.cache_features=true", "regularizers=[l2t_ww]"],
     "cannot serve regularizer l2t_ww"),
    # the L-BFGS probe solves its own objective
    (["strategy=freeze", "strategy.solver=lbfgs", "regularizers=[lwf]"], "cannot add regularizer lwf"),
    # L2T-ww's look-ahead steps are SGD's
    (["strategy=l2t_ww", "optim=adamw"], "set optim=sgd"),
    # a random init has no source task
    (["strategy=lwf", "backbone=timm", "backbone.name=test_resnet", "backbone.image_size=32"],
     "lwf needs the source model's own classifier"),
    (["strategy=co_tuning", "regularizers=[co_tuning]"], "regularizer co_tuning is given twice"),
])
def test_refused_combinations_say_why_in_one_line(tmp_path, capsys, overrides, message):
    assert re.search(message, refused_in_one_line(capsys, tmp_path, *overrides))


def test_the_source_head_is_kept_from_a_classifier_checkpoint_and_reads_first_token_features(tiny_bert_classifier):
    from transformers import BertForSequenceClassification

    cfg = OmegaConf.create({"kind": "hf", "name": "x", "weights": str(tiny_bert_classifier), "pooling": "cls",
                            "trust_remote_code": False, "drop_rate": 0.0})
    model = build_backbone(cfg, num_classes=2).eval()
    reference = BertForSequenceClassification.from_pretrained(tiny_bert_classifier).eval()
    tokens = model.preprocessing["tokenizer"](["the cat sat", "a dog ran fast"], return_tensors="pt", padding=True)
    batch = dict(tokens)
    with torch.no_grad():
        torch.testing.assert_close(model.source_head()(model.features(batch)), reference(**tokens).logits)
    assert not any("source" in n for n, _ in model.named_parameters())  # not part of the model
    mean_pooled = build_backbone(OmegaConf.merge(cfg, {"pooling": "mean"}), num_classes=2)
    assert mean_pooled.source_head() is None  # that head never read mean-pooled features


def test_the_shipped_source_model_carries_its_five_class_head():
    cfg = compose_config([])
    model = build_backbone(cfg.backbone, num_classes=10)
    head = model.source_head()
    assert head is not None and head.out_features == 5 and head.in_features == model.feature_dim


def test_an_exported_body_keeps_its_trained_head_as_the_next_runs_source_head(tmp_path):
    cfg = OmegaConf.create({"kind": "timm", "name": "test_resnet", "pretrained": False, "weights": None,
                            "image_size": 32, "drop_rate": 0.0})
    trained = build_backbone(cfg, num_classes=7)
    export_body(trained, tmp_path / "body.safetensors")
    reloaded = build_backbone(OmegaConf.merge(cfg, {"weights": str(tmp_path / "body.safetensors")}), num_classes=3)
    head = reloaded.source_head()
    assert torch.equal(head.weight, trained.head.weight) and torch.equal(head.bias, trained.head.bias)
    assert build_backbone(cfg, num_classes=3).source_head() is None  # random init: no source task
    with pytest.raises(TransferCliError, match="lwf needs the source model's own classifier"):
        source_head(build_backbone(cfg, num_classes=3), "lwf")
