// Loads UI workflow files into the real ComfyUI frontend (served at URL) in headless Chromium and prints,
// as one JSON object, what the frontend's own Export (API) -- app.graphToPrompt() -- makes of each file.
// Driven by tools/frontend_export.py, which serves the frontend and a catalogue and installs playwright-core.
//   node tools/frontend_export.js URL CHROMIUM_PATH FILE...
const { chromium } = require('playwright-core');
const fs = require('fs');

(async () => {
  const [url, executablePath, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
  const page = await browser.newPage();
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.app.canvas, null, { timeout: 90000 });
  await page.waitForTimeout(1000); // let the boot-time dialogs and extensions settle
  const results = {};
  for (const file of files) {
    const workflow = JSON.parse(fs.readFileSync(file, 'utf8'));
    try {
      results[file] = await page.evaluate(async (wf) => {
        await window.app.loadGraphData(wf, true, true, null);
        if (window.app.graph.nodes.length === 0) return { __not_loaded__: true };
        const { output } = await window.app.graphToPrompt();
        return output;
      }, workflow);
    } catch (error) {
      results[file] = { __error__: String(error) };
    }
  }
  process.stdout.write(JSON.stringify(results));
  await browser.close();
})();
