// Atelier seed controls: workflows saved before a seed declared "no control".
// ComfyUI's frontend adds a "control after generate" widget after every INT input named seed/noise_seed
// unless the input says control_after_generate=false. Atelier's seeds that pick *what* is made (the tiny
// models' weights, a generated world, LEP training, Time Router calibration) now say false: they stay put.
// A workflow the UI saved before that carries the control's value ("fixed", "randomize", ...) right after
// the seed; this drops it while the node loads, so no later widget value shifts by one.
import { app } from "../../scripts/app.js";

const SEED_NAMES = ["seed", "noise_seed"];
const CONTROL_MODES = ["fixed", "increment", "decrement", "randomize"];

function seedsWithoutControl(nodeData) {
  const inputs = { ...(nodeData?.input?.required || {}), ...(nodeData?.input?.optional || {}) };
  return Object.entries(inputs)
    .filter(([name, spec]) => SEED_NAMES.includes(name) && spec?.[0] === "INT" && spec?.[1]?.control_after_generate === false)
    .map(([name]) => name);
}

function dropStaleControls(node, info, seeds) {
  const values = info?.widgets_values;
  if (!Array.isArray(values) || !node.widgets) return;
  for (const name of seeds) {
    if (values.length <= node.widgets.length) return;  // nothing extra to drop
    const i = node.widgets.findIndex((w) => w.name === name);
    const next = node.widgets[i + 1];
    if (i < 0 || !CONTROL_MODES.includes(values[i + 1])) continue;
    if (next && typeof next.value === "string") continue;  // a real string widget follows: leave the values alone
    values.splice(i + 1, 1);
  }
}

app.registerExtension({
  name: "Atelier.SeedControls",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("Atelier")) return;
    const seeds = seedsWithoutControl(nodeData);
    if (!seeds.length) return;
    const configure = nodeType.prototype.configure;
    nodeType.prototype.configure = function (info) {
      dropStaleControls(this, info, seeds);
      return configure.apply(this, arguments);
    };
  },
});
