"""TOML configuration -> frozen dataclasses, validated once at start.

Why: the daemon runs unattended all night, so a typo in a key must stop it *at start* with a
message naming the key and the file, not three hours later. Every key can be overridden from
the command line (`--set section.key=value`, the value parsed as TOML, else taken as a string).

Sections [stack] and [quality] are passed through as dicts: their keys belong to the live
pipeline's LiveSettings and are validated against it when the service starts
(`daemon.session.live_settings`). The device
sections ([indi], [camera], [plan]) are `daemon.settings`: plain dataclasses, so loading a
config never imports the INDI client (a watch-only install has no PyIndi).
"""

from __future__ import annotations

import enum
import tomllib
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import NoneType, UnionType
from typing import Any

from daemon.io.formats import DEFAULT_PATTERNS
from daemon.settings import (
    CameraSettings,
    FocusSettings,
    IndiSettings,
    MountSettings,
    PlanSettings,
    SettingsError,
    SiteSettings,
)


class ConfigError(ValueError):
    """A config problem; the message names the file and the `section.key`."""


@dataclass(frozen=True)
class CaptureConfig:
    dir: Path
    recursive: bool = False
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    #: Size-stable fallback (file systems without close-after-write events): seconds unchanged.
    settle_s: float = 2.0
    #: Poll the folder instead of inotify: for network mounts (NFS/SMB client) written by
    #: another machine, where the kernel sees no events; completion is then size-stable.
    poll: bool = False
    #: Decode limit (bytes of float32 pixels): a frame declaring more is refused before it is
    #: decoded. Default: the memory the process may use / 8 (daemon.io.limits).
    max_frame_bytes: int | None = None
    #: CFA pattern (RGGB, BGGR, GRBG, GBRG) of TIFF frames whose sidecar names none; unset: mono.
    tiff_bayer: str | None = None

    def __post_init__(self) -> None:
        if self.tiff_bayer is not None and self.tiff_bayer.upper() not in ("RGGB", "BGGR", "GRBG", "GBRG"):
            raise ConfigError(f"[capture] tiff_bayer: {self.tiff_bayer!r} is not one of RGGB, BGGR, GRBG, GBRG")
        if self.max_frame_bytes is not None and self.max_frame_bytes <= 0:
            raise ConfigError(f"[capture] max_frame_bytes: {self.max_frame_bytes} must be > 0")


@dataclass(frozen=True)
class StateConfig:
    dir: Path
    #: 0 = checkpoint after every frame; otherwise at most this often (s) and at shutdown.
    #: Frames stacked after the last checkpoint are not lost by a crash: the ledger is in the
    #: same checkpoint, so they are stacked again from disk. Why not 0: the checkpoint holds
    #: the whole running stack (26 Mpx colour: 287 MB), seconds of writing on a Pi's SD card.
    checkpoint_every_s: float = 30.0
    #: Where stacks (FITS) and previews go; default: <state.dir>/output.
    output_dir: Path | None = None


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    rig: str = "default"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: Path | None = None
    discovery: bool = False
    keepalive_s: int = 30
    #: Longest edge of the preview JPEG (px) and the minimum seconds between previews.
    preview_max_edge: int = 1280
    preview_interval_s: float = 5.0
    #: Frame events kept while the broker is unreachable (oldest dropped beyond this).
    buffer: int = 1000


@dataclass(frozen=True)
class WebConfig:
    """The phone page and HTTP API (daemon.web). Without [web] nothing listens.
    host: address to listen on (0.0.0.0: the phone is on the LAN). port: TCP port.
    password: needed for every command; without one the page is view-only.
    cert_file, key_file: PEM files for HTTPS (both or neither)."""

    host: str = "0.0.0.0"
    port: int = 8080
    password: str | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class SolveSettings:
    """[solve]: plate solving of each stack's reference frame with astrometry.net, for the
    stack's WCS (daemon.reference_solve). enabled: None (the default) solves when `solve-field`
    is installed; time_limit_s: each solve's limit (s); radius_deg: how far from the position
    hint the solver searches (degrees); scale_error: the scale hint's fractional uncertainty;
    blind: also solve a frame whose pixel scale is unknown (no FOCALLEN or pixel size: a search
    over every scale, which may take the whole time limit)."""

    enabled: bool | None = None
    time_limit_s: float = 30.0
    radius_deg: float = 5.0
    scale_error: float = 0.15
    blind: bool = False

    def __post_init__(self) -> None:
        for key, value, high in (("time_limit_s", self.time_limit_s, 600.0), ("radius_deg", self.radius_deg, 180.0),
                                 ("scale_error", self.scale_error, 0.9)):
            if not 0 < value <= high:
                raise ConfigError(f"[solve] {key} = {value!r}: must be > 0 and <= {high:g}")


@dataclass(frozen=True)
class CalibrationConfig:
    """Config [calibration]: master files (ours or any FITS/raw frame) for new stacks."""

    bias: Path | None = None
    dark: Path | None = None
    flat: Path | None = None
    darkflat: Path | None = None

    def files(self) -> dict[str, str]:
        """The masters given, {kind: path}."""
        return {k: str(v) for k, v in (("bias", self.bias), ("dark", self.dark), ("flat", self.flat),
                                       ("darkflat", self.darkflat)) if v is not None}


@dataclass(frozen=True)
class Config:
    capture: CaptureConfig
    state: StateConfig
    mqtt: MqttConfig | None = None
    web: WebConfig | None = None
    calibration: CalibrationConfig = CalibrationConfig()
    solve: SolveSettings = SolveSettings()
    stack: dict[str, Any] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    indi: IndiSettings | None = None
    camera: CameraSettings = CameraSettings()
    plan: PlanSettings | None = None
    #: The night's plans in order: `[[plan]]` entries (`plan` is the first), or the one [plan].
    queue: tuple[PlanSettings, ...] = ()
    site: SiteSettings | None = None
    mount: MountSettings = MountSettings()
    focus: FocusSettings = FocusSettings()
    source: str = "<config>"

    @property
    def output_dir(self) -> Path:
        return self.state.output_dir or self.state.dir / "output"


_SECTIONS: dict[str, type] = {
    "capture": CaptureConfig,
    "state": StateConfig,
    "mqtt": MqttConfig,
    "web": WebConfig,
    "calibration": CalibrationConfig,
    "solve": SolveSettings,
    "indi": IndiSettings,
    "camera": CameraSettings,
    "plan": PlanSettings,
    "site": SiteSettings,
    "mount": MountSettings,
    "focus": FocusSettings,
}
_PASSTHROUGH = ("stack", "quality")


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` -> (section, key, value); value is TOML if it parses, else a string."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, key.strip(), value


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one TOML value against a dataclass field's type hint; ConfigError names
    `where` (the file and the key) when it does not fit."""
    origin = typing.get_origin(hint)
    if origin in (UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and NoneType in args:
            return None
        errors = []
        for arg in args:
            if arg is NoneType:
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0]
        return tuple(coerce(v, item, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value).expanduser()
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        choices = ", ".join(str(m.value) for m in hint)
        try:
            return hint(value)
        except ValueError:
            raise ConfigError(f"{where} = {value!r}: expected one of {choices}") from None
    raise ConfigError(f"{where}: unsupported type {hint!r}")  # pragma: no cover


def build_section(cls: type, data: dict, section: str, source: str) -> Any:
    """One section (or a command shaped like one) -> its dataclass; errors name source and key."""
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{source}: [{section}] {key}"
        if key not in known:
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = coerce(value, hints[key], where)
    for name, f in known.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"{source}: [{section}] {name}: required key missing")
    try:
        return cls(**kwargs)
    except SettingsError as exc:  # a value of the right type that cannot be used
        base = section.split()[0]  # "plan 2" (a [[plan]] entry): the settings say "[plan]"
        raise ConfigError(f"{source}: {str(exc).replace(f'[{base}]', f'[{section}]', 1)}") from None


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    """Validate a parsed TOML document; errors name `source` and the key."""
    kwargs: dict[str, Any] = {"source": source}
    for section, value in raw.items():
        if section == "plan" and isinstance(value, list):  # [[plan]]: the night's queue
            kwargs["queue"] = _plan_queue(value, source)
            kwargs["plan"] = kwargs["queue"][0]
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {section}: expected a [section], got {value!r}")
        if section in _PASSTHROUGH:
            kwargs[section] = dict(value)
        elif section in _SECTIONS:
            kwargs[section] = build_section(_SECTIONS[section], value, section, source)
        else:
            known = sorted([*_SECTIONS, *_PASSTHROUGH])
            raise ConfigError(f"{source}: [{section}]: unknown section (known: {', '.join(known)})")
    for required in ("capture", "state"):
        if required not in kwargs:
            raise ConfigError(f"{source}: [{required}] section missing (needs at least 'dir')")
    _check_folders(kwargs["capture"], kwargs["state"], source)
    web = kwargs.get("web")
    if web is not None and (web.cert_file is None) != (web.key_file is None):
        raise ConfigError(f"{source}: [web] cert_file and key_file: give both (HTTPS) or neither")
    if "plan" in kwargs and "queue" not in kwargs:
        kwargs["queue"] = (kwargs["plan"],)
    return Config(**kwargs)


def _plan_queue(entries: list, source: str) -> tuple[PlanSettings, ...]:
    """`[[plan]]` entries, each a [plan] of its own; errors name the entry (`[plan 2]`)."""
    if not entries:
        raise ConfigError(f"{source}: [[plan]]: no entries")
    plans = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: [[plan]] entry {i}: expected a table, got {entry!r}")
        plans.append(build_section(PlanSettings, entry, f"plan {i}", source))
    return tuple(plans)


def _check_folders(capture: CaptureConfig, state: StateConfig, source: str) -> None:
    """The daemon's own files (checkpoint, spool, stacks, preview.jpg) must not land where it
    watches: each write would be answered as a new file, forever."""
    watched = Path(capture.dir).expanduser().absolute()
    for key, folder in (("state.dir", state.dir), ("state.output_dir", state.output_dir or state.dir / "output")):
        path = Path(folder).expanduser().absolute()
        if path == watched or (capture.recursive and path.is_relative_to(watched)):
            raise ConfigError(f"{source}: [state] {key.split('.')[1]} = '{folder}': inside the watched capture.dir "
                              f"'{capture.dir}'; the daemon's own files would be read as new frames")


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read and validate a TOML file, applying `section.key=value` overrides first."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    for text in overrides:
        section, key, value = parse_override(text)
        raw.setdefault(section, {})
        if section == "plan" and isinstance(raw[section], list):
            for entry in raw[section]:  # [[plan]]: the override holds for every plan of the night
                if isinstance(entry, dict):
                    entry[key] = value
            continue
        if not isinstance(raw[section], dict):
            raise ConfigError(f"{path}: --set {text!r}: {section} is not a section")
        raw[section][key] = value
    return config_from_dict(raw, source=str(path))
