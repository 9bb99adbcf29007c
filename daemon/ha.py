"""Home Assistant MQTT discovery: the retained config messages that make the rig a device.

Pure (no MQTT here): `discovery_configs` returns {topic: config}; daemon.mqtt publishes them
when `mqtt.discovery` is on and publishes empty retained payloads on the same topics when it is
off, which is how Home Assistant removes entities. Sensors read the retained `status` JSON with
templates that round for display and yield `none` (unknown) while a value is missing; buttons
publish a fixed command (a constant id) on `cmd`; the preview is an `image` entity.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

MODEL = "lightbucket live-stacking daemon"

# object id: (name, value template, extra keys)
_SENSORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "state": ("State", "{{ value_json.state }}", {}),
    "target": ("Target", "{{ value_json.target }}", {}),
    "stack": ("Stack", "{{ value_json.stack }}", {}),
    "stacked": ("Frames stacked", "{{ value_json.frames.stacked }}", {"state_class": "total_increasing"}),
    "rejected": ("Frames rejected", "{{ value_json.frames.rejected }}", {"state_class": "total_increasing"}),
    "stacked_current": ("Frames in the stack", "{{ value_json.stacked_current }}", {"state_class": "measurement"}),
    "queue": ("Queue", "{{ value_json.queue }}", {"state_class": "measurement"}),
    "exposure": ("Total exposure", "{{ value_json.total_exposure_s | round(0) }}",
                 {"unit_of_measurement": "s", "device_class": "duration", "state_class": "measurement"}),
    "fwhm": ("FWHM", "{{ (value_json.last_frame.fwhm_px | round(2)) if value_json.last_frame and "
             "value_json.last_frame.fwhm_px is not none else none }}",
             {"unit_of_measurement": "px", "state_class": "measurement"}),
    "disk_free": ("Disk free", "{{ (value_json.disk_free_bytes / 1e9) | round(1) "
                  "if value_json.disk_free_bytes is not none else none }}",
                  {"unit_of_measurement": "GB", "device_class": "data_size", "state_class": "measurement"}),
    "camera_temperature": ("Camera temperature", "{{ (value_json.plan.temperature_c | round(1)) if value_json.plan "
                           "and value_json.plan.temperature_c is not none else none }}",
                           {"unit_of_measurement": "°C", "device_class": "temperature", "state_class": "measurement"}),
    "plan_progress": ("Plan progress", "{{ (100 * value_json.plan.frame / value_json.plan.count) | round(0) "
                      "if value_json.plan and value_json.plan.count and value_json.plan.frame is not none "
                      "else none }}", {"unit_of_measurement": "%", "state_class": "measurement"}),
    "plan_eta": ("Plan ETA", "{{ value_json.plan.eta_s | round(0) if value_json.plan and "
                 "value_json.plan.eta_s is not none else none }}",
                 {"unit_of_measurement": "s", "device_class": "duration"}),
    "last_reject": ("Last reject reason", "{{ value_json.last_reject.reason if value_json.last_reject else none }}",
                    {}),
}
BUTTONS = ("pause", "resume", "stop", "restack")
OLD_CAMERA = "homeassistant/camera/lightbucket_{rig}/preview/config"


def sw_version() -> str:
    try:
        return metadata.version("lightbucket")
    except metadata.PackageNotFoundError:
        return "unknown"


def discovery_configs(rig: str, prefix: str, page_url: str | None = None) -> dict[str, dict]:
    """{discovery topic: config JSON} for the rig's device.

    Parameters
    ----------
    rig : str
        `mqtt.rig`; object ids are `lightbucket_<rig>_<object>`.
    prefix : str
        The rig's topic prefix, `lightbucket/<rig>/`.
    page_url : str, optional
        The web page ([web]), the device's `configuration_url`.
    """
    node = f"lightbucket_{rig}"
    device: dict[str, Any] = {"identifiers": [node], "name": f"lightbucket {rig}", "manufacturer": "lightbucket",
                              "model": MODEL, "sw_version": sw_version()}
    if page_url:
        device["configuration_url"] = page_url
    common = {"availability_topic": prefix + "availability", "device": device}
    out: dict[str, dict] = {}
    for obj, (name, template, extra) in _SENSORS.items():
        out[f"homeassistant/sensor/{node}/{obj}/config"] = {
            "unique_id": f"{node}_{obj}", "name": name, "state_topic": prefix + "status",
            "value_template": template, **extra, **common}
    for action in BUTTONS:
        out[f"homeassistant/button/{node}/{action}/config"] = {
            "unique_id": f"{node}_{action}", "name": action.capitalize(), "command_topic": prefix + "cmd",
            "payload_press": f'{{"id": "ha-{action}", "action": "{action}"}}', **common}
    out[f"homeassistant/image/{node}/preview/config"] = {
        "unique_id": f"{node}_preview", "name": "Preview", "image_topic": prefix + "preview",
        "content_type": "image/jpeg", **common}
    return out


def removed_topics(rig: str) -> list[str]:
    """Every topic `discovery_configs` uses, and the `camera` preview of earlier versions: an
    empty retained payload on each removes the entity."""
    return [*discovery_configs(rig, ""), OLD_CAMERA.format(rig=rig)]
