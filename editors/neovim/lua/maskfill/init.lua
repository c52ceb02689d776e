-- maskfill for Neovim: starts maskfill-lsp and shows its completions.
--   0.12+: inline (ghost text) completion, accepted and cycled with keymaps;
--   0.10/0.11: the completion menu (textDocument/completion), which the server also serves.
local M = {}

local NAME = 'maskfill-lsp' -- also the name of lsp/maskfill-lsp.lua
local INLINE = 'textDocument/inlineCompletion'
local COMPLETION = 'textDocument/completion'

M.defaults = {
  cmd = { 'maskfill-lsp', '--stdio' }, -- a list, or the path of the executable
  settings = {}, -- server settings, camelCase as in the README (model, device, quant, ...)
  filetypes = nil, -- nil: every filetype
  root_markers = { '.git' },
  inline = true, -- false: use the completion menu even where inline completion exists
  keymaps = { -- insert mode; false (or a false entry) leaves keys alone
    accept = '<Tab>', -- accept the inline suggestion, else insert the key itself
    next = '<M-]>', -- next / previous candidate; with none to cycle, ask for several first
    prev = '<M-[>',
    trigger = '<C-Space>', -- ask now: several inline candidates, or the completion menu
  },
}

local function has_inline_api()
  return vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.enable ~= nil
end

-- Client methods are called with `:` from 0.11 on; 0.10 has plain functions.
local HAS_0_11 = vim.fn.has('nvim-0.11') == 1

local function supports(client, method, bufnr)
  if HAS_0_11 then
    return client:supports_method(method, bufnr)
  end
  return client.supports_method(method, { bufnr = bufnr })
end

local function merge_options(opts)
  opts = opts or {}
  local merged = vim.tbl_extend('force', M.defaults, opts)
  if opts.keymaps == false then
    merged.keymaps = {}
  else
    merged.keymaps = vim.tbl_extend('force', M.defaults.keymaps, opts.keymaps or {})
  end
  if type(merged.cmd) == 'string' then
    merged.cmd = { merged.cmd, '--stdio' }
  end
  return merged
end

-- The server's last `maskfill/didChangeStatus`: { state = loading|ready|failed|..., enabled,
-- error }.
M.server_status = nil

-- For a statusline: "maskfill: ready", "maskfill: loading", "maskfill: off", or "" before start.
function M.statusline()
  local status = M.server_status
  if not status then
    return ''
  end
  if status.state == 'ready' and status.enabled == false then
    return 'maskfill: off'
  end
  return 'maskfill: ' .. tostring(status.state)
end

-- (A failed load also arrives as window/showMessage, which Neovim shows; no second message.)
-- Public: lsp/maskfill-lsp.lua routes the notification here when setup() was never called.
function M.on_server_status(_, params)
  M.server_status = params
  vim.api.nvim_exec_autocmds('User', { pattern = 'MaskfillStatus', modeline = false })
end

-- The vim.lsp config this plugin registers (exposed for tests and for vim.lsp.start users).
function M.lsp_config(opts)
  local config = {
    cmd = opts.cmd,
    root_markers = opts.root_markers,
    filetypes = opts.filetypes,
    -- An empty Lua table would be sent as a JSON list; the server wants an object.
    init_options = next(opts.settings) and opts.settings or vim.empty_dict(),
    handlers = { ['maskfill/didChangeStatus'] = M.on_server_status },
  }
  if not (opts.inline and has_inline_api()) then
    -- The server answers textDocument/completion only for clients without inline completion
    -- (no double suggestions), so don't announce it when the menu is what we want.
    config.before_init = function(params)
      params.capabilities.textDocument.inlineCompletion = nil
    end
  end
  return config
end

local function map(bufnr, lhs, rhs, desc, expr)
  if lhs then
    vim.keymap.set('i', lhs, rhs, { buffer = bufnr, expr = expr, desc = desc })
  end
end

-- Neovim 0.12 asks for inline completions only with triggerKind Automatic, which the server
-- answers with one item; candidates to cycle come only from an Invoked request. The public
-- vim.lsp.inline_completion API cannot send one or show an answer it did not ask for, so this
-- reaches the buffer's inline-completion state (vim.lsp._capability, internal in 0.12) and hands
-- our answer to its own handler, which stores and shows it as it does its own.
local function inline_state(bufnr)
  local ok, capability = pcall(require, 'vim.lsp._capability')
  local state = ok and vim.tbl_get(capability, 'all', 'inline_completion', 'active', bufnr)
  if state and type(state.handler) == 'function' and type(state.count_items) == 'function' then
    return state
  end
end

local UNSUPPORTED = 'maskfill: this Neovim has no inline-completion state to show requested '
  .. 'candidates in; only the automatic suggestion is available'

-- Sends an Invoked inline request (several candidates) and shows the answer, numbered.
local function request_candidates(client, bufnr)
  if not vim.lsp.inline_completion.is_enabled({ bufnr = bufnr }) then
    return -- the user turned inline completion off here
  end
  local state = inline_state(bufnr)
  if not (state and state.client_state[client.id]) then
    vim.notify_once(UNSUPPORTED, vim.log.levels.WARN)
    return
  end
  -- Neovim's own Automatic request, pending or in flight, would replace (or, superseded by
  -- ours on the server, hide) our answer: drop it.
  if type(state.reset_timer) == 'function' then
    state:reset_timer()
  end
  for id, request in pairs(client.requests) do
    if request.bufnr == bufnr and request.method == INLINE and request.type == 'pending' then
      client:cancel_request(id)
    end
  end
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.context = { triggerKind = vim.lsp.protocol.InlineCompletionTriggerKind.Invoked }
  local tick = vim.api.nvim_buf_get_changedtick(bufnr)
  local cursor = vim.api.nvim_win_get_cursor(0)
  client:request(INLINE, params, function(err, result, ctx)
    local current = vim.api.nvim_get_current_buf() == bufnr
      and vim.api.nvim_buf_get_changedtick(bufnr) == tick
      and vim.deep_equal(vim.api.nvim_win_get_cursor(0), cursor)
      and vim.api.nvim_get_mode().mode:sub(1, 1) == 'i'
    -- An error here is a superseded or cancelled request: the user moved on.
    if err or not result or not current or inline_state(bufnr) ~= state then
      return
    end
    if not state.client_state[client.id] then
      return -- detached meanwhile
    end
    state:handler(nil, result, ctx)
    if state.current then
      vim.lsp.inline_completion.select({ bufnr = bufnr, count = 0 }) -- adds "(1/N)"
    end
  end, bufnr)
end

-- Cycles the candidates; with nothing to cycle (only the automatic suggestion, or none), asks
-- for several instead.
local function cycle_or_request(client, bufnr, count)
  local state = inline_state(bufnr)
  if state and state.current and state:count_items() > 1 then
    vim.lsp.inline_completion.select({ bufnr = bufnr, count = count })
  else
    request_candidates(client, bufnr)
  end
end

local function attach_inline(client, bufnr, keymaps)
  vim.lsp.inline_completion.enable(true, { bufnr = bufnr })
  map(bufnr, keymaps.accept, function()
    if not vim.lsp.inline_completion.get() then
      return keymaps.accept -- nothing to accept: the key does what it always does
    end
  end, 'maskfill: accept the suggestion', true)
  map(bufnr, keymaps.next, function()
    cycle_or_request(client, bufnr, 1)
  end, 'maskfill: next suggestion')
  map(bufnr, keymaps.prev, function()
    cycle_or_request(client, bufnr, -1)
  end, 'maskfill: previous suggestion')
  map(bufnr, keymaps.trigger, function()
    request_candidates(client, bufnr)
  end, 'maskfill: suggest several now')
end

-- Neovim's completion menu inserts only the first word of a plain-text item's textEdit
-- (`newText:match('^%S*')`), which for code completions is often nothing (" 'Hello'") or a
-- fragment. Once our item is confirmed, replace that word with the edit's whole text.
local function complete_whole_edit(client, bufnr)
  local item = vim.v.completed_item
  local lsp = vim.tbl_get(item or {}, 'user_data', 'nvim', 'lsp')
  local edit = lsp and lsp.client_id == client.id and lsp.completion_item.textEdit
  if not edit or lsp.completion_item.insertTextFormat == 2 or edit.newText == item.word then
    return -- not ours, a snippet (Neovim expands those itself), or already complete
  end
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  local start = col - #item.word -- the word replaced the edit's range up to the cursor
  local lines = vim.split(edit.newText, '\n', { plain = true })
  vim.api.nvim_buf_set_text(bufnr, row - 1, start, row - 1, col, lines)
  local last = #lines == 1 and start + #lines[1] or #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { row + #lines - 1, last })
end

local function attach_menu(client, bufnr, keymaps)
  if not vim.lsp.completion then
    return -- Neovim 0.10: vim.lsp.omnifunc (<C-x><C-o>) is set on attach
  end
  -- autotrigger asks when a typed character is one of the server's triggerCharacters; a server
  -- that announces none leaves the menu to <C-Space> (keymaps.trigger). No request per keystroke:
  -- a model answer costs far more than a word-list lookup.
  vim.lsp.completion.enable(true, client.id, bufnr, { autotrigger = true })
  vim.api.nvim_create_autocmd('CompleteDone', {
    group = vim.api.nvim_create_augroup('maskfill.complete.' .. bufnr, { clear = true }),
    buffer = bufnr,
    callback = function()
      complete_whole_edit(client, bufnr)
    end,
  })
  map(bufnr, keymaps.trigger, function()
    vim.lsp.completion.get()
  end, 'maskfill: complete now')
end

-- Called on LspAttach for our client: picks inline completion or the completion menu.
function M.attach(client, bufnr, opts)
  if opts.inline and has_inline_api() and supports(client, INLINE, bufnr) then
    attach_inline(client, bufnr, opts.keymaps)
    vim.b[bufnr].maskfill_mode = 'inline'
  elseif supports(client, COMPLETION, bufnr) then
    attach_menu(client, bufnr, opts.keymaps)
    vim.b[bufnr].maskfill_mode = 'menu'
  end
end

-- The server command in effect: setup()'s, else the vim.lsp config's (lsp/maskfill-lsp.lua).
function M.server_cmd()
  if M.options then
    return M.options.cmd
  end
  local config = vim.lsp.config and vim.lsp.config[NAME]
  return config and config.cmd or M.defaults.cmd
end

-- The full path of the server executable `cmd` runs, or nil when there is none.
function M.executable(cmd)
  if type(cmd) ~= 'table' or type(cmd[1]) ~= 'string' then
    return nil
  end
  local path = vim.fn.exepath(cmd[1])
  return path ~= '' and path or nil
end

-- Why the server cannot start when its executable is missing, and the fixes.
function M.missing_executable_problem(cmd)
  local name = type(cmd) == 'table' and tostring(cmd[1]) or tostring(cmd)
  if name:find('[/\\]') then
    return name .. ' (the cmd given to setup()) is not an executable file'
  end
  return name .. ' is not an executable on PATH'
end
M.MISSING_EXECUTABLE_FIXES = {
  'install maskfill (its README, "Install") so that maskfill-lsp is on PATH',
  "or give setup() its full path: require('maskfill').setup({ cmd = { "
    .. "'/path/to/venv/bin/maskfill-lsp', '--stdio' } })",
}

-- Neovim skips a config whose executable is missing without a word (only lsp.log says it), so
-- say it once, when a file that would have started the server opens. True when it exists.
local function executable_or_warn(opts)
  if type(opts.cmd) ~= 'table' or M.executable(opts.cmd) then
    return true
  end
  if not M.missing_reported then
    M.missing_reported = true
    local message = ('maskfill: %s, so there are no completions. Fix: %s; %s. Details: '
      .. ':checkhealth maskfill'):format(
      M.missing_executable_problem(opts.cmd),
      M.MISSING_EXECUTABLE_FIXES[1],
      M.MISSING_EXECUTABLE_FIXES[2]
    )
    -- Deferred: an error-level message raised inside a FileType autocmd would abort the
    -- other FileType handlers (ftplugins, syntax) for that buffer.
    vim.schedule(function()
      vim.notify(message, vim.log.levels.ERROR)
    end)
  end
  return false
end

local function serves_buffer(opts, bufnr)
  local filetype = vim.bo[bufnr].filetype
  local ft_ok = not opts.filetypes or vim.tbl_contains(opts.filetypes, filetype)
  return ft_ok and vim.bo[bufnr].buftype == ''
end

-- Runs a server command (maskfill.status, maskfill.toggle); returns its result or nil, error.
function M.exec(command, timeout_ms)
  local client = vim.lsp.get_clients({ name = NAME, bufnr = 0 })[1]
    or vim.lsp.get_clients({ name = NAME })[1]
  if not client then
    return nil, 'maskfill-lsp is not running'
  end
  local params = { command = command, arguments = {} }
  local method, timeout = 'workspace/executeCommand', timeout_ms or 2000
  local request_sync = HAS_0_11 and client.request_sync or function(_, ...)
    return client.request_sync(...)
  end
  local reply, err = request_sync(client, method, params, timeout, vim.api.nvim_get_current_buf())
  if not reply then
    return nil, err or 'no reply'
  end
  if reply.err then
    return nil, reply.err.message
  end
  return reply.result
end

local function report(command)
  local result, err = M.exec(command)
  if err then
    vim.notify('maskfill: ' .. err, vim.log.levels.ERROR)
  else
    vim.notify(vim.inspect(result), vim.log.levels.INFO)
  end
end

function M.setup(opts)
  opts = merge_options(opts)
  M.options = opts -- for :checkhealth maskfill
  M.missing_reported = false
  local config = M.lsp_config(opts)
  local group = vim.api.nvim_create_augroup('maskfill', { clear = true })

  vim.api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      local client = vim.lsp.get_client_by_id(args.data.client_id)
      if client and client.name == NAME then
        M.attach(client, args.buf, opts)
      end
    end,
  })

  if vim.lsp.config then -- 0.11+
    vim.lsp.config(NAME, config)
    vim.lsp.enable(NAME)
    vim.api.nvim_create_autocmd('FileType', {
      group = group,
      callback = function(args)
        if serves_buffer(opts, args.buf) then
          executable_or_warn(opts)
        end
      end,
    })
  else -- 0.10: start it for each file buffer ourselves
    vim.api.nvim_create_autocmd('FileType', {
      group = group,
      callback = function(args)
        if serves_buffer(opts, args.buf) and executable_or_warn(opts) then
          local root = vim.fs.root(args.buf, opts.root_markers)
          vim.lsp.start(vim.tbl_extend('force', config, { name = NAME, root_dir = root }))
        end
      end,
    })
  end

  vim.api.nvim_create_user_command('MaskfillStatus', function()
    report('maskfill.status')
  end, { desc = 'Show the maskfill server status' })
  vim.api.nvim_create_user_command('MaskfillToggle', function()
    report('maskfill.toggle')
  end, { desc = 'Turn maskfill completions on or off' })
end

return M
