// The install guide is the README inside the extension. vsce stores it as `readme.md`, a
// checkout run from source has `README.md`: on a case-sensitive file system only the file's own
// name opens, so it is looked up among the extension's files. vscode-free.
export function readmeName(files: string[]): string {
  return files.find((name) => name.toLowerCase() === "readme.md") ?? "README.md";
}
