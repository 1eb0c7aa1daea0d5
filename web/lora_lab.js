// LoRA Lab frontend: live step, loss and a loss sparkline on the Train LoRA node while it runs.
// The grid and the loss curve arrive as ordinary node previews (ui images), so need nothing here.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE = "LoraLabTrainLora";
const HISTORY = 300; // losses kept for the sparkline

function nodeById(id) {
  return app.graph?.getNodeById(Number(id));
}

api.addEventListener("lora_lab.progress", ({ detail }) => {
  const node = nodeById(detail.node);
  if (!node) return;
  const state = (node.loraLab ??= { losses: [] });
  if (detail.step === 1) state.losses = [];
  state.losses.push(detail.loss);
  if (state.losses.length > HISTORY) state.losses.shift();
  Object.assign(state, detail, { status: "training" });
  node.setDirtyCanvas(true, false);
});

api.addEventListener("lora_lab.checkpoint", ({ detail }) => {
  const node = nodeById(detail.node);
  if (node?.loraLab) node.loraLab.saved = `saved step ${detail.step}`;
});

api.addEventListener("lora_lab.stopped", ({ detail }) => {
  const node = nodeById(detail.node);
  if (node?.loraLab) node.loraLab.status = detail.message ?? `stopped, saved ${detail.path}`;
});

app.registerExtension({
  name: "lora_lab.train_progress",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== TRAIN_NODE) return;
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      const state = this.loraLab;
      if (!state || this.flags?.collapsed) return;
      const width = this.size[0] - 20;
      const top = this.size[1] - 46;
      ctx.save();
      ctx.fillStyle = "#bbb";
      ctx.font = "12px sans-serif";
      const speed = state.seconds_per_step ? ` · ${state.seconds_per_step.toFixed(2)} s/step` : "";
      ctx.fillText(`step ${state.step}/${state.total} · loss ${state.loss.toFixed(4)}${speed}`, 10, top);
      if (state.saved || state.status !== "training") ctx.fillText(state.status !== "training" ? state.status : state.saved, 10, top + 14);
      const losses = state.losses;
      if (losses.length > 1) {
        const low = Math.min(...losses), high = Math.max(...losses) || 1;
        ctx.strokeStyle = "#4a9eff";
        ctx.beginPath();
        losses.forEach((value, i) => {
          const x = 10 + (i / (losses.length - 1)) * width;
          const y = top + 40 - ((value - low) / (high - low || 1)) * 20;
          i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
        });
        ctx.stroke();
      }
      ctx.restore();
    };
  },
});
