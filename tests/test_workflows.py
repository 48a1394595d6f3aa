"""The shipped workflows: API graphs validate in ComfyUI, and each has a faithful UI-format twin.

``workflows/api/*.json`` is what ``/prompt`` takes (and what
``test_workflow_execution.py`` runs); ``workflows/*.json`` is what the
frontend opens by drag-and-drop and lists in its template browser, written by
``tools/build_ui_workflows.py``.  Structure checks need no ComfyUI; widget
order, validation and the "no drift" check use the test ComfyUI.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

import comfyui_support as cs

REPO_ROOT = Path(__file__).resolve().parent.parent
API_DIR = REPO_ROOT / "workflows" / "api"
UI_DIR = REPO_ROOT / "workflows"
BUILDER = REPO_ROOT / "tools" / "build_ui_workflows.py"
API_NAMES = sorted(p.stem for p in API_DIR.glob("*.json"))
SEED_NAMES = {"seed", "noise_seed"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_ui_workflows", BUILDER)
    assert spec is not None and spec.loader is not None, f"cannot import {BUILDER}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_three_workflows_ship_in_both_formats() -> None:
    assert {"fragment_batch_32", "full_pipeline", "profile_and_extract"} <= set(API_NAMES)
    ui_names = sorted(p.stem for p in UI_DIR.glob("*.json"))
    assert ui_names == API_NAMES, "every workflows/api/X.json needs workflows/X.json and nothing else lives there"


@pytest.mark.parametrize("name", API_NAMES)
def test_ui_twin_has_the_api_nodes_and_links(name: str) -> None:
    api = _load(API_DIR / f"{name}.json")
    ui = _load(UI_DIR / f"{name}.json")
    assert ui["version"] == 0.4 and isinstance(ui["config"], dict) and isinstance(ui["extra"], dict)
    nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    assert {k: n["type"] for k, n in nodes.items()} == {k: v["class_type"] for k, v in api.items()}
    assert ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    for node_id, node in nodes.items():
        assert node["properties"] == {"Node name for S&R": node["type"]}
        assert node["mode"] == 0 and node["flags"] == {}
        title = api[node_id].get("_meta", {}).get("title")
        if title:
            assert node.get("title") == title

    # API links: (target node, input name) -> [source node, source slot]
    api_links = {(node_id, inp): tuple(v) for node_id, e in api.items() for inp, v in e["inputs"].items() if _is_link(v)}
    ui_links = {}
    links_by_id = {}
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        assert link_id not in links_by_id, f"link id {link_id} used twice"
        links_by_id[link_id] = (src, src_slot, dst, dst_slot, kind)
        target = nodes[str(dst)]
        slot = target["inputs"][dst_slot]
        assert slot["link"] == link_id, f"node {dst} slot {dst_slot} does not point back at link {link_id}"
        assert slot["type"] == kind
        source_out = nodes[str(src)]["outputs"][src_slot]
        assert source_out["slot_index"] == src_slot and link_id in source_out["links"]
        assert source_out["type"] == kind
        ui_links[(str(dst), slot["name"])] = (str(src), src_slot)
    assert ui_links == api_links
    assert ui["last_link_id"] == max(links_by_id, default=0)
    for node in ui["nodes"]:  # nothing dangles: every slot link and output link is a real link of that node
        for slot in node["inputs"]:
            assert slot["link"] is None or links_by_id[slot["link"]][2] == node["id"]
        for out in node["outputs"]:
            assert all(links_by_id[i][0] == node["id"] for i in out["links"])


@pytest.mark.parametrize("name", API_NAMES)
def test_ui_twin_reads_left_to_right_in_execution_order(name: str) -> None:
    ui = _load(UI_DIR / f"{name}.json")
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert sorted(n["order"] for n in ui["nodes"]) == list(range(len(nodes)))
    for _, src, _, dst, _, _ in ui["links"]:
        assert nodes[src]["order"] < nodes[dst]["order"], f"link {src}->{dst} runs against the execution order"
        assert nodes[src]["pos"][0] + nodes[src]["size"][0] < nodes[dst]["pos"][0], f"link {src}->{dst} points left"
    boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1]) for n in ui["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], f"nodes overlap: {a} {b}"


@pytest.mark.parametrize("name", API_NAMES)
def test_ui_twin_groups_its_stages_and_opens_at_a_readable_zoom(name: str) -> None:
    """Issue #28 item 5: numbered, titled groups hold every node, and the saved view opens at 75 % or more."""
    ui = _load(UI_DIR / f"{name}.json")
    titles = [g["title"] for g in ui["groups"]]
    assert titles and [t.split(". ", 1)[0] for t in titles] == [str(i) for i in range(1, len(titles) + 1)], titles
    stages = {"full_pipeline": ["profile", "extract", "batch"], "profile_and_extract": ["profile", "extract"]}
    if name in stages:
        assert [t.split(". ", 1)[1] for t in titles] == stages[name]
    for node in ui["nodes"]:  # each node (its title bar too) lies inside exactly one group
        x, y = node["pos"]
        w, h = node["size"]
        inside = [g["title"] for g in ui["groups"] if g["bounding"][0] <= x and x + w <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] <= y - 30 and y + h <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, f"node {node['id']} ({node['type']}) lies in groups {inside}"
    ds = ui["extra"]["ds"]
    assert 0.75 <= ds["scale"] <= 1.0 and len(ds["offset"]) == 2, ds
    first = ui["groups"][0]["bounding"]  # the first stage's top-left corner is on a 1600x1000 screen
    assert 0 <= (first[0] + ds["offset"][0]) * ds["scale"] < 400 and 0 <= (first[1] + ds["offset"][1]) * ds["scale"] < 300
    info = ui["extra"]["info"]
    assert info["title"] and len(info["description"]) > 40, info


def _widget_inputs(cls: type) -> list[tuple[str, Any, dict[str, Any], bool]]:
    """(name, type, options, required) of the inputs the frontend draws as widgets, in its order."""
    types = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for input_name, spec in (types.get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 else {}
            # forceInput: a socket only (frontend 1.x draws no widget and saves no value for it)
            if (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput"):
                out.append((input_name, kind, options, section == "required"))
    return out


def _frontend_default(kind: Any, options: dict[str, Any]) -> Any:
    if "default" in options:
        return options["default"]
    return kind[0] if isinstance(kind, (list, tuple)) else None


@pytest.mark.parametrize("name", API_NAMES)
def test_ui_widget_values_map_back_to_the_api_inputs(comfyui: cs.ComfyUIRuntime, comfyui_pack: ModuleType, name: str) -> None:
    api = _load(API_DIR / f"{name}.json")
    ui = _load(UI_DIR / f"{name}.json")
    for node in ui["nodes"]:
        entry = api[str(node["id"])]
        cls = comfyui.nodes.NODE_CLASS_MAPPINGS[node["type"]]
        values = list(node["widgets_values"])
        recovered, defaults = {}, {}
        for input_name, kind, options, required in _widget_inputs(cls):
            assert values, f"node {node['id']} ({node['type']}): widgets_values ends before {input_name!r}"
            value = values.pop(0)
            if _is_link(entry["inputs"].get(input_name)):
                pass  # a widget converted to an input and fed by a link: its value is a placeholder
            elif input_name in entry["inputs"] or required:
                recovered[input_name] = value
            else:  # an optional widget the API graph leaves out: the frontend shows its default
                defaults[input_name] = (value, _frontend_default(kind, options))
            if (kind == "INT" and input_name in SEED_NAMES) or options.get("control_after_generate"):
                assert values and values.pop(0) == "fixed", f"node {node['id']}: {input_name} lacks control_after_generate"
        assert values == [], f"node {node['id']} ({node['type']}): {len(values)} widget values left over"
        literals = {k: v for k, v in entry["inputs"].items() if not _is_link(v)}
        assert recovered == literals, f"node {node['id']} ({node['type']})"
        for input_name, (value, default) in defaults.items():
            assert value == default, f"node {node['id']} ({node['type']}): optional {input_name!r} is {value!r}, default {default!r}"
        # Link slots are exactly the non-widget inputs, in INPUT_TYPES order (optional ones too).
        widget_names = {w[0] for w in _widget_inputs(cls)}
        types = cls.INPUT_TYPES()
        # (a widget fed by a link is a slot too, named after its widget, as the frontend converts it)
        expected_slots = [
            (n, "COMBO" if isinstance(spec[0], (list, tuple)) else spec[0]) for section in ("required", "optional") for n, spec in (types.get(section) or {}).items()
            if n not in widget_names or _is_link(entry["inputs"].get(n))
        ]
        assert [(s["name"], s["type"]) for s in node["inputs"]] == expected_slots
        expected_outputs = list(zip(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES, cls.RETURN_TYPES))
        assert [(o["name"], o["type"]) for o in node["outputs"]] == expected_outputs


def test_ui_files_are_what_the_builder_writes_now(
    comfyui: cs.ComfyUIRuntime, comfyui_pack: ModuleType, tmp_path: Path
) -> None:
    builder = _builder()
    first = builder.build_all(API_DIR, tmp_path / "a", comfyui.nodes.NODE_CLASS_MAPPINGS)
    second = builder.build_all(API_DIR, tmp_path / "b", comfyui.nodes.NODE_CLASS_MAPPINGS)
    assert [p.name for p in first] == [f"{n}.json" for n in API_NAMES]
    for fresh, again in zip(first, second):
        assert fresh.read_bytes() == again.read_bytes(), f"{fresh.name}: the builder is not deterministic"
        shipped = UI_DIR / fresh.name
        assert shipped.read_bytes() == fresh.read_bytes(), (
            f"{shipped} is stale: run `.venv/bin/python tools/build_ui_workflows.py` and commit the result"
        )


def test_builder_rejects_broken_graphs(comfyui: cs.ComfyUIRuntime, comfyui_pack: ModuleType) -> None:
    builder = _builder()
    classes = comfyui.nodes.NODE_CLASS_MAPPINGS
    api = _load(API_DIR / "fragment_batch_32.json")
    broken = copy.deepcopy(api)
    broken["7"]["inputs"]["vae"] = ["99", 2]
    with pytest.raises(builder.WorkflowError, match="missing node '99'"):
        builder.build_ui_workflow(broken, classes)
    broken = copy.deepcopy(api)
    broken["7"]["inputs"]["vae"] = ["1", 1]  # CLIP into a VAE slot
    with pytest.raises(builder.WorkflowError, match="expected VAE"):
        builder.build_ui_workflow(broken, classes)
    broken = copy.deepcopy(api)
    broken["5"]["class_type"] = "NoSuchNode"
    with pytest.raises(builder.WorkflowError, match="unknown class_type"):
        builder.build_ui_workflow(broken, classes)


@pytest.mark.parametrize("name", API_NAMES)
def test_api_workflow_validates_in_comfyui(
    comfyui: cs.ComfyUIRuntime, comfyui_pack: ModuleType, sd15_checkpoint: str, name: str
) -> None:
    prompt = _load(API_DIR / f"{name}.json")
    for entry in prompt.values():
        if "ckpt_name" in entry["inputs"]:
            entry["inputs"]["ckpt_name"] = sd15_checkpoint
    # FragmentLoader's fragment_name is a list of the files in models/fragments: the shipped name
    # validates once such a fragment exists (profile_and_extract writes it).  A stand-in is enough here.
    wanted = {
        entry["inputs"]["fragment_name"] for entry in prompt.values()
        if entry["class_type"] == "FragmentLoader" and entry["inputs"]["fragment_name"] != "(none)"
    }
    folder = comfyui.model_dir("fragments")
    placeholders = [folder / n for n in sorted(wanted) if not (folder / n).exists()]
    try:
        for path in placeholders:
            path.write_text("{}")
        comfyui.folder_paths.filename_list_cache.clear()
        valid, error, outputs, node_errors = cs._validate(comfyui.execution, "validate-" + name, prompt)
    finally:
        for path in placeholders:
            path.unlink(missing_ok=True)
        comfyui.folder_paths.filename_list_cache.clear()
    assert valid is True and not node_errors, cs._format_validation(error, node_errors)
    expected_outputs = {
        k for k, e in prompt.items() if getattr(comfyui.nodes.NODE_CLASS_MAPPINGS[e["class_type"]], "OUTPUT_NODE", False)
    }
    assert set(outputs) == expected_outputs


def _fake_node(inputs: dict[str, Any], outputs: tuple[str, ...]) -> type:
    return type("Fake", (), {"INPUT_TYPES": classmethod(lambda cls: {"required": inputs}), "RETURN_TYPES": outputs})


def test_builder_groups_a_settings_node_with_the_stage_that_reads_it() -> None:
    """A node that reads no link (a manual-levers settings node, an empty latent) sits in the group of its first
    reader, and the stages follow the order they run: so a new node needs no entry in the builder."""
    builder = _builder()
    classes = {
        "ProfilerModelLoader": _fake_node({"ckpt_name": (["a.safetensors"],)}, ("MODEL", "FRAGMENT_PROFILE")),
        "ManualLevers": _fake_node({"ratio": ("FLOAT", {"default": 0.5})}, ("FRAGMENT_LEVERS",)),
        "FragmentExtractor": _fake_node({"profile": ("FRAGMENT_PROFILE",), "levers": ("FRAGMENT_LEVERS",)}, ("FRAGMENT",)),
        "FragmentLoader": _fake_node({"model": ("MODEL",), "fragment": ("FRAGMENT",)}, ("MODEL", "STRING")),
    }
    api = {
        "1": {"class_type": "ProfilerModelLoader", "inputs": {"ckpt_name": "a.safetensors"}},
        "2": {"class_type": "ManualLevers", "inputs": {"ratio": 0.5}},
        "3": {"class_type": "FragmentExtractor", "inputs": {"profile": ["1", 1], "levers": ["2", 0]}},
        "4": {"class_type": "FragmentLoader", "inputs": {"model": ["1", 0], "fragment": ["3", 0]}},
    }
    ui = builder.build_ui_workflow(api, classes, "full_pipeline")
    groups = ui["groups"]
    assert [g["title"] for g in groups] == ["1. profile", "2. extract", "3. batch"]

    def group_of(node_id: int) -> str:
        node = next(n for n in ui["nodes"] if n["id"] == node_id)
        (title,) = [g["title"] for g in groups if g["bounding"][0] <= node["pos"][0] < g["bounding"][0] + g["bounding"][2]]
        return title

    assert [group_of(i) for i in (1, 2, 3, 4)] == ["1. profile", "2. extract", "2. extract", "3. batch"]
    assert [g["bounding"][0] for g in groups] == sorted(g["bounding"][0] for g in groups)
    assert ui["extra"]["info"] == builder.TEMPLATES["full_pipeline"] and ui["extra"]["ds"]["scale"] >= 0.75
