"""The committed stubs must be exactly what scripts/gen_proto.py produces from proto/."""
import importlib.util
import pathlib

from tests.conftest import REPO_ROOT


def test_generated_stubs_match_proto(tmp_path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("gen_proto", REPO_ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    fresh = gen.generate(tmp_path)
    assert fresh, "no stubs generated"
    committed_dir = REPO_ROOT / "pdserve" / "v1"
    for path in fresh:
        committed = committed_dir / path.name
        assert committed.is_file(), f"{path.name} is not committed; run python scripts/gen_proto.py"
        assert committed.read_text() == path.read_text(), \
            f"{path.name} differs from proto/; run python scripts/gen_proto.py"
