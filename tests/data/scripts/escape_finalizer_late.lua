-- sandbox escape: finalizer_late (a __gc added after setmetatable is never called)
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local mt = {}
  setmetatable({}, mt)
  mt.__gc = function() while true do end end
  collectgarbage()
  ctx:route("out", "after gc")
end
