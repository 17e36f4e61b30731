"""The local cluster's broker files (controller.cli.broker): what cluster up writes under STATE_DIR/mqtt."""

from __future__ import annotations

import base64
import hashlib
import stat
from pathlib import Path

import pytest

from controller.cli.broker import BrokerError, acl_text, hash_password, prepare_broker, read_facility_env


def test_password_hash_is_mosquittos_pbkdf2_sha512_format() -> None:
    salt = b"0123456789ab"
    text = hash_password("secret", salt)
    kind, iterations, salt_b64, digest_b64 = text.split("$")[1:]
    assert (kind, iterations, base64.b64decode(salt_b64)) == ("7", "101", salt)
    assert base64.b64decode(digest_b64) == hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101, dklen=64)
    assert hash_password("secret") != hash_password("secret")  # a fresh salt each time


def test_acl_lists_each_node_with_its_own_topics_only() -> None:
    text = acl_text(["n1", "n2"], "murakkab/v1/")
    assert "user n1\ntopic write murakkab/v1/nodes/n1/#" in text
    assert "user n2\ntopic write murakkab/v1/nodes/n2/#" in text
    assert "pattern" not in text.split("\n", 1)[1]  # no pattern rules: every right is written out
    with pytest.raises(BrokerError, match="reserved"):
        acl_text(["controller"])
    for bad in ("a/b", "a+b", "a#", "a b", ""):
        with pytest.raises(BrokerError, match="cannot be an MQTT user name"):
            acl_text([bad])


def test_prepare_broker_keeps_passwords_across_ups_and_writes_private_files(tmp_path: Path) -> None:
    first = prepare_broker(tmp_path, ["n1"], 18830, mosquitto="/bin/true")
    env = read_facility_env(tmp_path)
    assert env["MQTT_PORT"] == "18830" and env["MQTT_USER"] == "facility" and len(env["MQTT_PASSWORD"]) >= 24
    second = prepare_broker(tmp_path, ["n1", "n2"], 18831, mosquitto="/bin/true")
    assert read_facility_env(tmp_path)["MQTT_PASSWORD"] == env["MQTT_PASSWORD"]
    assert first.password_files["n1"].read_text() == second.password_files["n1"].read_text()
    assert second.mqtt_table("n2") == {"enabled": True, "host": "127.0.0.1", "port": 18831, "username": "n2",
                                       "password_file": str(tmp_path / "mqtt" / "secrets" / "n2.password"),
                                       "topic_prefix": "murakkab/v1"}
    assert second.argv == ["/bin/true", "-c", str(tmp_path / "mqtt" / "mosquitto.conf")]
    conf = (tmp_path / "mqtt" / "mosquitto.conf").read_text()
    assert "listener 18831 127.0.0.1" in conf and "allow_anonymous false" in conf
    for path in (tmp_path / "mqtt").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path


def test_prepare_broker_without_mosquitto_says_how_to_go_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("controller.cli.broker.find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match="--no-mqtt"):
        prepare_broker(tmp_path, ["n1"], 18830)
