-- Config for the Neovim end-to-end tests (tests/e2e/test_neovim.py): the maskfill plugin from
-- editors/neovim, set up as a user would, plus read-only probes the test calls through
-- `nvim --server SOCK --remote-expr "luaeval('maskfill_test.NAME()')"` (each returns JSON).
local root = assert(vim.env.MASKFILL_ROOT, 'MASKFILL_ROOT is not set')
vim.opt.runtimepath:prepend(root .. '/editors/neovim')
vim.opt.swapfile = false
vim.opt.shortmess:append('I')

-- Every vim.notify message, as the user would have seen it (the plugin's own reports).
local notifications = {}
local notify = vim.notify
vim.notify = function(message, level, opts)
  table.insert(notifications, { message = message, level = level or vim.log.levels.INFO })
  return notify(message, level, opts)
end

-- No engine deadline: on a busy CI machine a 3 s deadline would cut the denoising short and
-- the memorized text would come out partial, depending on load rather than on the code.
local settings = { timeoutMs = 600000 }
if vim.env.MASKFILL_NO_SETUP == '1' then
  -- editors/neovim/README.md's alternative to setup(): the config from lsp/maskfill-lsp.lua,
  -- inline completion turned on and Neovim's documented accept-or-Tab key, nothing else.
  vim.lsp.config('maskfill-lsp', {
    cmd = vim.env.MASKFILL_CMD and vim.json.decode(vim.env.MASKFILL_CMD) or nil,
    init_options = settings,
  })
  vim.lsp.enable('maskfill-lsp')
  vim.lsp.inline_completion.enable()
  vim.keymap.set('i', '<Tab>', function()
    if not vim.lsp.inline_completion.get() then
      return '<Tab>'
    end
  end, { expr = true, desc = 'Accept the inline completion' })
else
  require('maskfill').setup({
    -- Unset: the plugin's default command (maskfill-lsp on PATH).
    cmd = vim.env.MASKFILL_CMD and vim.json.decode(vim.env.MASKFILL_CMD) or nil,
    inline = vim.env.MASKFILL_INLINE ~= '0',
    settings = settings,
  })
end

local function ghost_marks()
  local ns = vim.api.nvim_get_namespaces()['nvim.lsp.inline_completion']
  return ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
end

-- The ghost text's first lines (the suggestion shown at the cursor), without the hint.
local function ghost_texts()
  local texts = {}
  for _, mark in ipairs(ghost_marks()) do
    local parts = {}
    for _, chunk in ipairs(mark[4].virt_text or {}) do
      if chunk[2] == 'ComplHint' then
        table.insert(parts, chunk[1])
      end
    end
    table.insert(texts, table.concat(parts))
  end
  return texts
end

-- Neovim's " (i/N)" after a candidate chosen among several (ComplHintMore), or "".
local function ghost_hint()
  for _, mark in ipairs(ghost_marks()) do
    local lines = { mark[4].virt_text or {}, unpack(mark[4].virt_lines or {}) }
    for _, line in ipairs(lines) do
      for _, chunk in ipairs(line) do
        if chunk[2] == 'ComplHintMore' then
          return chunk[1]
        end
      end
    end
  end
  return ''
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
    local provider = clients[1] and clients[1].server_capabilities.completionProvider
    return vim.json.encode({
      mode = vim.b.maskfill_mode or '',
      statusline = require('maskfill').statusline(),
      clients = #clients,
      keymaps = keymaps,
      trigger_characters = provider and provider.triggerCharacters or {},
    })
  end,
  ghost = function()
    return vim.json.encode(ghost_texts())
  end,
  hint = function()
    return vim.json.encode(ghost_hint())
  end,
  -- Labels of the items in the active completion menu (insert-completion mode).
  menu = function()
    local labels = {}
    for _, item in ipairs(vim.fn.complete_info({ 'items' }).items or {}) do
      table.insert(labels, item.abbr ~= '' and item.abbr or item.word)
    end
    return vim.json.encode(labels)
  end,
  -- The whole text (textEdit.newText) of the selected menu item, or null.
  selected_edit = function()
    local info = vim.fn.complete_info({ 'items', 'selected' })
    local item = info.items and info.items[info.selected + 1]
    local lsp_item = item and vim.tbl_get(item, 'user_data', 'nvim', 'lsp', 'completion_item')
    local edit = lsp_item and lsp_item.textEdit
    return vim.json.encode(edit and edit.newText or vim.NIL)
  end,
  notifications = function()
    return vim.json.encode(notifications)
  end,
  -- The lines of the :checkhealth report buffer, or [] while there is none.
  health = function()
    local bufnr = vim.fn.bufnr('health://')
    if bufnr == -1 then
      return vim.json.encode({})
    end
    return vim.json.encode(vim.api.nvim_buf_get_lines(bufnr, 0, -1, false))
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
