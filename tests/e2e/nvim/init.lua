-- Config for the Neovim end-to-end tests (tests/e2e/test_neovim.py): the maskfill plugin from
-- editors/neovim, set up as a user would, plus read-only probes the test calls through
-- `nvim --server SOCK --remote-expr "luaeval('maskfill_test.NAME()')"` (each returns JSON).
local root = assert(vim.env.MASKFILL_ROOT, 'MASKFILL_ROOT is not set')
vim.opt.runtimepath:prepend(root .. '/editors/neovim')
vim.opt.swapfile = false
vim.opt.shortmess:append('I')

require('maskfill').setup({
  cmd = vim.json.decode((assert(vim.env.MASKFILL_CMD, 'MASKFILL_CMD is not set'))),
  inline = vim.env.MASKFILL_INLINE ~= '0',
  -- No engine deadline: on a busy CI machine a 3 s deadline would cut the denoising short and
  -- the memorized text would come out partial, depending on load rather than on the code.
  settings = { timeoutMs = 600000 },
})

local function ghost_texts()
  local ns = vim.api.nvim_get_namespaces()['nvim.lsp.inline_completion']
  if not ns then
    return {}
  end
  local texts = {}
  for _, mark in ipairs(vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })) do
    local parts = {}
    for _, chunk in ipairs(mark[4].virt_text or {}) do
      table.insert(parts, chunk[1])
    end
    table.insert(texts, table.concat(parts))
  end
  return texts
end

_G.maskfill_test = {
  -- A server command's reply (maskfill.status, maskfill.toggle), or the error that prevented it.
  exec = function(command)
    local result, err = require('maskfill').exec(command)
    return vim.json.encode({ result = result or vim.NIL, err = err or vim.NIL })
  end,
  -- How the plugin attached: 'inline', 'menu', or '' before LspAttach.
  attached = function()
    local clients = vim.lsp.get_clients({ name = 'maskfill-lsp', bufnr = 0 })
    local keymaps = {}
    for _, lhs in ipairs({ '<Tab>', '<M-]>', '<M-[>', '<C-Space>' }) do
      keymaps[lhs] = vim.fn.maparg(lhs, 'i', false, true).desc or vim.NIL
    end
    return vim.json.encode({
      mode = vim.b.maskfill_mode or '',
      statusline = require('maskfill').statusline(),
      clients = #clients,
      keymaps = keymaps,
    })
  end,
  ghost = function()
    return vim.json.encode(ghost_texts())
  end,
  -- Labels of the items in the active completion menu (insert-completion mode).
  menu = function()
    local labels = {}
    for _, item in ipairs(vim.fn.complete_info({ 'items' }).items or {}) do
      table.insert(labels, item.abbr ~= '' and item.abbr or item.word)
    end
    return vim.json.encode(labels)
  end,
  buffer = function()
    return vim.json.encode({
      lines = vim.api.nvim_buf_get_lines(0, 0, -1, true),
      mode = vim.api.nvim_get_mode().mode,
    })
  end,
  config = function()
    local config = vim.lsp.config['maskfill-lsp']
    return vim.json.encode({
      cmd = config.cmd,
      enabled = vim.lsp.is_enabled('maskfill-lsp'),
      init_options = config.init_options,
      has_before_init = config.before_init ~= nil,
      commands = {
        status = vim.fn.exists(':MaskfillStatus') == 2,
        toggle = vim.fn.exists(':MaskfillToggle') == 2,
      },
      inline_api = vim.lsp.inline_completion ~= nil,
    })
  end,
}
