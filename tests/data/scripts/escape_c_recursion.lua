-- sandbox escape: c_recursion
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local t = setmetatable({}, { __index = function(t, k) return t[k] end })
  return t.x
end
