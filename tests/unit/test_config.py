import pathlib

import pytest
from pydantic import ValidationError

from pdserve.config import load_config


def test_yaml_then_env_then_overrides(tmp_path: pathlib.Path):
    path = tmp_path / "c.yaml"
    path.write_text("worker:\n  role: decode\n  num_kv_blocks: 64\nkvtransfer:\n  backends: [tcp]\n")
    cfg = load_config(path, environ={"PDSERVE_WORKER__NUM_KV_BLOCKS": "128", "PDSERVE_KVTRANSFER__CHECKSUM": "true"},
                      overrides={"model.name": "tiny"})
    assert cfg.worker.role == "decode"
    assert cfg.worker.num_kv_blocks == 128
    assert cfg.kvtransfer.backends == ["tcp"]
    assert cfg.kvtransfer.checksum is True


def test_bad_values_are_rejected_with_field_names():
    with pytest.raises(ValidationError, match="backends"):
        load_config(environ={"PDSERVE_KVTRANSFER__BACKENDS": '["carrier-pigeon"]'})
    with pytest.raises(ValidationError, match="unexpected_field|extra"):
        load_config(overrides={"worker.unexpected_field": 1})
