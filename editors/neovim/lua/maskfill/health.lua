-- :checkhealth maskfill: the server executable, its version, the install check it runs
-- (`maskfill-lsp --check`: torch build, CUDA, model, memory), and the running server's state.
local M = {}

local health = vim.health
local NAME = 'maskfill-lsp'
local CHECK_TIMEOUT_MS = 120000 -- imports torch and reads the checkpoint headers; no weights
local CHECK_STATUS = { ok = health.ok, info = health.info, warn = health.warn, FAIL = health.error }

local function setup_section(maskfill)
  health.start('maskfill: setup')
  if maskfill.options then
    health.ok("require('maskfill').setup() was called")
  elseif vim.lsp.is_enabled and vim.lsp.is_enabled(NAME) then
    health.info("vim.lsp.enable('maskfill-lsp') without setup(): no inline keymaps from maskfill")
  else
    health.warn('maskfill is not set up', { "call require('maskfill').setup({}) in your config" })
  end
  local inline = vim.lsp.inline_completion ~= nil and vim.lsp.inline_completion.enable ~= nil
  local wants_inline = not maskfill.options or maskfill.options.inline
  local v = vim.version()
  local mode = (inline and wants_inline) and 'inline (ghost text)' or 'completion menu'
  health.info(('Neovim %d.%d.%d: %s'):format(v.major, v.minor, v.patch, mode))
end

-- `cmd` without its transport flags, plus --check and the settings the server would get.
local function check_command(executable, cmd, settings)
  local args, skip = { executable }, false
  local given = {}
  for i = 2, #cmd do
    local arg = cmd[i]
    if skip then
      skip = false
    elseif arg == '--tcp' or arg == '--token-file' then
      skip = true
    elseif arg ~= '--stdio' then
      table.insert(args, arg)
      given[arg] = true
    end
  end
  table.insert(args, '--check')
  for _, key in ipairs({ 'model', 'device', 'quant' }) do
    local value = settings and settings[key]
    -- Flags in cmd override settings in the server too.
    if type(value) == 'string' and value ~= '' and not given['--' .. key] then
      vim.list_extend(args, { '--' .. key, value })
    end
  end
  return args
end

local function run(args, timeout_ms)
  local ok, proc = pcall(vim.system, args, { text = true })
  if not ok then
    return nil, tostring(proc)
  end
  local result = proc:wait(timeout_ms)
  if result.code == 124 and result.signal == 9 then -- vim.system's own timeout
    return nil, ('did not finish in %d s'):format(timeout_ms / 1000)
  end
  return result
end

local function executable_section(maskfill)
  health.start('maskfill: server executable')
  local cmd = maskfill.server_cmd()
  if type(cmd) ~= 'table' then
    health.info('cmd is a function: not checked')
    return nil
  end
  local executable = maskfill.executable(cmd)
  if not executable then
    health.error(maskfill.missing_executable_problem(cmd), maskfill.MISSING_EXECUTABLE_FIXES)
    return nil
  end
  health.ok('found: ' .. executable)
  local result, err = run({ executable, '--version' }, 30000)
  if result and result.code == 0 then
    health.ok('version: ' .. vim.trim(result.stdout))
  else
    health.error('`maskfill-lsp --version` failed: ' .. (err or vim.trim(result.stderr)), {
      'reinstall maskfill in that environment',
    })
  end
  return executable, cmd
end

local function install_section(executable, cmd, settings)
  local args = check_command(executable, cmd, settings)
  health.start('maskfill: install (' .. table.concat(vim.list_slice(args, 2), ' ') .. ')')
  local result, err = run(args, CHECK_TIMEOUT_MS)
  if not result then
    health.error('the check ' .. err)
    return
  end
  for _, line in ipairs(vim.split(result.stdout, '\n', { trimempty = true })) do
    local word, rest = line:match('^(%S+)%s+(.*)$')
    local report = CHECK_STATUS[word]
    if report then
      report((rest:gsub('%s%s+', ' '))) -- the check pads its columns for a terminal
    else
      health.info(line)
    end
  end
  if result.code ~= 0 and result.stderr ~= '' then
    health.error(vim.trim(result.stderr))
  end
end

-- A JSON null may arrive as vim.NIL.
local function present(value)
  if value == vim.NIL then
    return nil
  end
  return value
end

local function server_section(maskfill)
  health.start('maskfill: server')
  local clients = vim.lsp.get_clients({ name = NAME })
  if #clients == 0 then
    health.warn('not running', {
      'it starts when a file opens (a filetype it serves, a normal buffer)',
      'its log: :LspLog',
    })
    return
  end
  local client = clients[1]
  local buffers = vim.tbl_keys(client.attached_buffers or {})
  health.ok(('running (client %d, attached to %d buffer(s))'):format(client.id, #buffers))
  local status, err = maskfill.exec('maskfill.status', 5000)
  if not status then
    health.error('maskfill.status failed: ' .. tostring(err))
    return
  end
  local model = ('%s on %s, quant %s'):format(
    tostring(present(status.model) or 'the embedded model'),
    tostring(status.device),
    tostring(status.quant)
  )
  if status.loadState == 'ready' then
    local latency = present(status.latencyMsP50)
    health.ok(('model ready: %s (loaded in %.0f ms%s)'):format(
      model,
      tonumber(present(status.loadMs)) or 0,
      latency and (', completion p50 %.0f ms'):format(latency) or ''
    ))
  elseif status.loadState == 'failed' then
    health.error('model failed to load: ' .. tostring(present(status.error)), {
      'the install check above says why, or see :LspLog',
    })
  else
    health.info(('model %s: %s'):format(tostring(status.loadState), model))
  end
  if status.enabled == false then
    health.warn('completions are turned off', { ':MaskfillToggle turns them on' })
  end
end

function M.check()
  local maskfill = require('maskfill')
  setup_section(maskfill)
  local executable, cmd = executable_section(maskfill)
  if executable then
    install_section(executable, cmd, maskfill.options and maskfill.options.settings)
  end
  server_section(maskfill)
end

return M
