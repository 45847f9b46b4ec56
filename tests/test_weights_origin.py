"""results.json says where the body's weights came from (file and sha256, folder, hub, random init), so P-T
and RI-T runs can be told apart, and `report --by weights.source` groups by it."""
import hashlib
import json

from omegaconf import OmegaConf

from transfer_cli.backbones import build_backbone
from transfer_cli.backbones.origin import sha256
from transfer_cli.cli import main
from transfer_cli.config_files import ASSETS_DIR

SMOKE = ["train", "trainer=smoke", "trainer.device=cpu", "trainer.max_epochs=1"]


def test_results_record_the_weights_file_or_random_init_and_report_groups_by_it(tmp_path, capsys):
    main([*SMOKE, f"hydra.run.dir={tmp_path / 'runs' / 'pt'}"])
    main([*SMOKE, f"hydra.run.dir={tmp_path / 'runs' / 'rit'}", "strategy=scratch"])
    asset = ASSETS_DIR / "fmnist_test_resnet.safetensors"
    pretrained = json.loads((tmp_path / "runs" / "pt" / "results.json").read_text())
    assert pretrained["full_config"]["backbone"]["pretrained"] is False  # the quickstart's config says so, yet:
    assert pretrained["weights"] == {"source": "file", "path": str(asset),
                                     "sha256": hashlib.sha256(asset.read_bytes()).hexdigest()}
    assert json.loads((tmp_path / "runs" / "rit" / "results.json").read_text())["weights"] == {"source": "random"}

    capsys.readouterr()
    main(["report", str(tmp_path / "runs"), "--by", "weights.source", "--out", str(tmp_path / "report")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| weights.source |") and [r.split("|")[1].strip() for r in rows[1:]] == ["file", "random"]


def test_a_model_folder_is_hashed_by_its_weight_files(tiny_bert):
    cfg = OmegaConf.create({"kind": "hf", "name": "x", "pretrained": True, "weights": str(tiny_bert), "pooling": "cls",
                            "trust_remote_code": False, "drop_rate": 0.0})
    origin = build_backbone(cfg, num_classes=2).weights_origin
    weights = sorted(p for p in tiny_bert.iterdir() if p.suffix in (".safetensors", ".bin"))
    combined = hashlib.sha256("".join(f"{p.name}:{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                                      for p in weights).encode()).hexdigest()
    assert weights and origin == {"source": "folder", "path": str(tiny_bert), "sha256": combined}
    assert sha256(tiny_bert) == combined
    assert build_backbone(cfg, num_classes=2, pretrained=False).weights_origin == {"source": "random"}
