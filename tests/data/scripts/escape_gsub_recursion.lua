-- sandbox escape: gsub_recursion
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local function f(s) return (s:gsub(".", f)) end
  return f("abc")
end
