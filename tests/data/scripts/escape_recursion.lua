-- sandbox escape: recursion
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local function f(n) return 1 + f(n + 1) end
  return f(1)
end
