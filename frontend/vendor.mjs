// Copy the browser builds our pages load (the upload page, GraphiQL) into versioned folders under
// media_app/static/media_app/vendor/ (committed, so `make run` needs no npm).
// Run after changing a version in package.json: `npm ci && npm run vendor`.
import { copyFileSync, mkdirSync, readFileSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const target = join(here, "..", "media_app", "static", "media_app", "vendor");

const packages = [
  { name: "tus-js-client", files: ["dist/tus.min.js", "LICENSE"] },
  {
    name: "dashjs",
    files: [
      "dist/modern/umd/dash.mediaplayer.min.js",
      "dist/modern/umd/dash.mediaplayer.min.js.LICENSE.txt",
      "LICENSE.md",
    ],
  },
  // GraphiQL at /graphql/ (media_app/templates/media_app/graphiql.html): its UMD build and the
  // React it needs, instead of the unpkg.com copies Strawberry's own page loads.
  { name: "react", files: ["umd/react.production.min.js", "LICENSE"] },
  { name: "react-dom", files: ["umd/react-dom.production.min.js", "LICENSE"] },
  { name: "graphiql", files: ["graphiql.min.js", "graphiql.min.css", "LICENSE"] },
];

rmSync(target, { recursive: true, force: true });
for (const pkg of packages) {
  const root = join(here, "node_modules", pkg.name);
  const { version } = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
  const out = join(target, `${pkg.name}-${version}`);
  mkdirSync(out, { recursive: true });
  for (const file of pkg.files) {
    const name = file.split("/").pop();
    copyFileSync(join(root, file), join(out, name));
    console.log(`${pkg.name}@${version}: ${file} -> ${join("vendor", `${pkg.name}-${version}`, name)}`);
  }
}
