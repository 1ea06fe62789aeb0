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


def test_tls_files_go_together_and_become_the_cluster_credential(tmp_path: pathlib.Path):
    with pytest.raises(ValidationError, match="set all three or none"):
        load_config(environ={"PDSERVE_CLUSTER__TLS_CA_FILE": "ca.pem"})
    with pytest.raises(ValidationError, match="set both or neither"):
        load_config(environ={"PDSERVE_GATEWAY__TLS_CERT_FILE": "gw.pem"})
    for name in ("ca", "cert", "key"):
        (tmp_path / f"{name}.pem").write_bytes(f"{name} pem".encode())
    cfg = load_config(environ={f"PDSERVE_CLUSTER__TLS_{n.upper()}_FILE": str(tmp_path / f"{n}.pem")
                               for n in ("ca", "cert", "key")} | {"PDSERVE_CLUSTER__SECRET": "s3"})
    cred = cfg.cluster_credential
    assert cred.secret == "s3" and cred.tls.ca_pem == b"ca pem" and cred.tls.key_pem == b"key pem"
    assert not load_config(environ={}).cluster_credential
