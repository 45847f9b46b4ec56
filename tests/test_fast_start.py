"""Fast start: a smoke run of a timm backbone imports only what it uses, none of the heavy libraries it
does not need (transformers, matplotlib, tensorboard, mlflow, scikit-learn)."""
import json
import subprocess
import sys

UNUSED = ["transformers", "matplotlib", "torch.utils.tensorboard", "mlflow", "sklearn", "scipy", "pandas",
          "torch_pruning"]

PROBE = """
import json, sys
from transfer_cli.cli import main
main(["train", "trainer=smoke", "trainer.device=cpu", "hydra.run.dir=" + sys.argv[1]])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {u.split(".")[0] for u in %r})))
""" % (UNUSED,)


def test_a_smoke_run_imports_none_of_the_libraries_it_does_not_use(tmp_path):
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "run")], capture_output=True, text=True,
                          check=True)
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert (tmp_path / "run" / "results.json").exists()
    assert not imported & set(UNUSED), sorted(imported & set(UNUSED))
