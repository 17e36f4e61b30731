"""The ``[mqtt]`` table of agent.toml and controller.toml."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MqttSettings(BaseModel):
    """Where the broker is and how to log in. Disabled by default: MQTT is optional.

    The password is never inline: ``password_file`` names a file holding it (one line; surrounding whitespace
    is stripped). ``tls`` turns on TLS, verified against ``ca_file`` (or the system's CAs when it is unset).
    A lost connection is retried after a capped, fully jittered exponential delay between
    ``reconnect_base_s`` and ``reconnect_cap_s``.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str = ""
    password_file: Path | None = None
    tls: bool = False
    ca_file: Path | None = None
    topic_prefix: str = "murakkab/v1"
    reconnect_base_s: float = Field(0.5, gt=0, le=3600)
    reconnect_cap_s: float = Field(30.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _check(self) -> "MqttSettings":
        prefix = self.topic_prefix.strip("/")
        if not prefix or any(c in prefix for c in "+#\0"):
            raise ValueError("topic_prefix must be a non-empty topic without wildcards (e.g. murakkab/v1)")
        if self.reconnect_cap_s < self.reconnect_base_s:
            raise ValueError("reconnect_cap_s must be at least reconnect_base_s")
        if self.password_file is not None and not self.username:
            raise ValueError("password_file is set but username is empty")
        return self

    def password(self) -> str | None:
        """The password from ``password_file`` (None without one); raises OSError when it cannot be read."""
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip()
