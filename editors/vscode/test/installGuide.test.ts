import { describe, expect, it } from "vitest";
import { readmeName } from "../src/installGuide";

describe("readmeName", () => {
  it("finds the README under the name it has on disk", () => {
    expect(readmeName(["package.json", "readme.md", "out"])).toBe("readme.md"); // a .vsix
    expect(readmeName(["README.md", "src"])).toBe("README.md"); // a checkout
    expect(readmeName(["package.json"])).toBe("README.md");
  });
});
