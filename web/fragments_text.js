// Prompt Fragments: the status a node reports (ComfyUI's {"ui": {"text": [...]}} return) shown on the node itself.
//
// FragmentExtractor, FragmentLoader and BatchGenerator send their status as ui.text after each run; ComfyUI passes it to
// node.onExecuted in the browser that queued the prompt.  It goes into a read-only multiline box at the bottom of the
// node, which grows to fit.  A fallback (the full model ran in place of the fragment asked for) also sends ui.warning:
// the node turns amber and the frontend's toast says so, so a fallback is never silent.  The box is left out of the
// saved workflow and the queued prompt: it is output, not an input.
//
// Works with the current frontend (comfyui-frontend-package) and the March-2024 one bundled with ComfyUI then: both
// serve scripts/app.js and scripts/widgets.js; only the toast API is new, so it is looked up, never assumed.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const NODE_TYPES = new Set(["FragmentExtractor", "FragmentLoader", "BatchGenerator", "FragmentStatus"]);
const WIDGET_NAME = "fragment_status";
const WARNING_COLOR = "#7a5a00";
const WARNING_BGCOLOR = "#4d3800";
const WARNING_TEXT = "#ffd27a";
const TOAST_LIFE_MS = 20000;
// The box's font (ComfyUI's textarea: monospace, about 10 px) and the most lines it grows to before it scrolls.
const CHAR_WIDTH = 7;
const LINE_HEIGHT = 14;
const MAX_LINES = 24;
const MIN_WIDTH_FOR_LONG_TEXT = 360;

function joined(lines) {
    return Array.isArray(lines) ? lines.map(String).join("\n") : lines == null ? "" : String(lines);
}

function statusWidget(node) {
    let widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
    if (widget) {
        return widget;
    }
    widget = ComfyWidgets.STRING(node, WIDGET_NAME, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // not in the saved workflow's widgets_values
    widget.options = widget.options || {};
    widget.options.serialize = false; // nor in the queued prompt (the DOM widget's options hold its value accessors)
    if (widget.inputEl) {
        widget.inputEl.readOnly = true;
        widget.inputEl.classList.add("fragments-status");
        widget.inputEl.style.opacity = "0.85";
    }
    return widget;
}

function showWarning(node, widget, warning) {
    const el = widget.inputEl;
    if (warning) {
        if (node.fragmentsColors === undefined) {
            node.fragmentsColors = { color: node.color, bgcolor: node.bgcolor };
        }
        node.color = WARNING_COLOR;
        node.bgcolor = WARNING_BGCOLOR;
        if (el) {
            el.style.color = WARNING_TEXT;
            el.style.fontWeight = "bold";
            el.dataset.fragmentsWarning = "true";
        }
    } else {
        if (node.fragmentsColors !== undefined) {
            node.color = node.fragmentsColors.color;
            node.bgcolor = node.fragmentsColors.bgcolor;
            delete node.fragmentsColors;
        }
        if (el) {
            el.style.color = "";
            el.style.fontWeight = "";
            delete el.dataset.fragmentsWarning;
        }
    }
}

function toast(node, text) {
    const api = app.extensionManager?.toast;
    if (api && typeof api.add === "function") {
        api.add({ severity: "warn", summary: `${node.title || node.type}: fallback to the full model`, detail: text, life: TOAST_LIFE_MS });
    } else {
        console.warn(`[Prompt Fragments] ${node.title || node.type}: ${text}`); // the 2024 frontend has no toasts
    }
}

// Lines the text takes wrapped at the node's width: the box is sized from this, not from the DOM, because the
// frontend hides DOM widgets when zoomed out and a hidden textarea measures 0.
function wrappedLines(text, width) {
    const perLine = Math.max(16, Math.floor((width - 40) / CHAR_WIDTH));
    return text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / perLine)), 0);
}

function fitToText(node, widget, text) {
    if (text.length > 120 && node.size[0] < MIN_WIDTH_FOR_LONG_TEXT) {
        node.size[0] = MIN_WIDTH_FOR_LONG_TEXT; // a warning is read, not scrolled through
    }
    const height = Math.min(MAX_LINES, wrappedLines(text, node.size[0])) * LINE_HEIGHT + 18;
    widget.options.getMinHeight = () => height; // both frontends' DOM widget layout reads it (the box may grow more)
    requestAnimationFrame(() => {
        const size = node.computeSize();
        size[0] = Math.max(size[0], node.size[0]);
        size[1] = Math.max(size[1], node.size[1]);
        node.setSize(size);
        app.graph.setDirtyCanvas(true, false);
    });
}

app.registerExtension({
    name: "PromptFragments.NodeText",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODE_TYPES.has(nodeData.name)) {
            return;
        }
        // The current frontend leaves a widget with serialize === false out of widgets_values; the 2024 one does
        // not, so the box's text is taken out here (it would be an extra value in the saved workflow).
        const onSerialize = nodeType.prototype.onSerialize;
        nodeType.prototype.onSerialize = function (data) {
            onSerialize?.apply(this, arguments);
            const index = this.widgets?.findIndex((w) => w.name === WIDGET_NAME) ?? -1;
            if (index >= 0 && Array.isArray(data.widgets_values) && data.widgets_values.length > index) {
                data.widgets_values.splice(index, 1);
            }
        };
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = joined(message?.text);
            const warning = joined(message?.warning);
            if (!text && !warning) {
                return;
            }
            const widget = statusWidget(this);
            widget.value = text || warning;
            showWarning(this, widget, !!warning);
            if (warning) {
                toast(this, warning);
            }
            fitToText(this, widget, widget.value);
        };
    },
});
