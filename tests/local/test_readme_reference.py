"""The README's MoTRun field reference is generated from the CRD and must stay in sync with it."""

import subprocess
import sys
from pathlib import Path

import yaml

from mot_operator import docs_gen

REPO = Path(__file__).resolve().parents[2]


def test_readme_reference_matches_the_crd():
    proc = subprocess.run([sys.executable, "-m", "mot_operator.docs_gen", "--check"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_reference_lists_every_spec_field_with_its_default():
    crd = yaml.safe_load((REPO / "crds" / "motruns.mot.dev.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    text = docs_gen.reference(REPO / "crds" / "motruns.mot.dev.yaml")
    for name in spec["properties"]:
        assert f"| `spec.{name}` |" in text
    assert "| `spec.teachers[].name` | string | yes |" in text
    assert "| `spec.training.steps` | integer |  | `50` |" in text


def test_check_fails_on_a_stale_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{docs_gen.BEGIN}\nold table\n{docs_gen.END}\n\nrest\n")
    assert docs_gen.main(["--readme", str(readme), "--check"]) == 1
    assert docs_gen.main(["--readme", str(readme)]) == 0
    assert docs_gen.main(["--readme", str(readme), "--check"]) == 0
    assert readme.read_text().endswith("\n\nrest\n") and "old table" not in readme.read_text()
