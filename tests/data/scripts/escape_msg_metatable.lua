-- sandbox escape: msg_metatable
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local mt = getmetatable(msg)
  if mt then mt.__gc = nil mt.__index = nil end
  setmetatable(msg, {})
end
