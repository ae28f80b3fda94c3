// A pack extension as packs write them: the app from the frontend's legacy script path, a helper module of its
// own beside it, and a hook that sees the pack's node definition when the editor registers it.
import { app } from "../../scripts/app.js";
import { greetingLabel } from "./lib/label.js";

window.__packWeb = { loaded: true, definitions: [] };

app.registerExtension({
  name: "latentloom.tests.v1_web",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "PackWebGreeting") {
      window.__packWeb.definitions.push(greetingLabel(nodeData.display_name));
    }
  },
});
