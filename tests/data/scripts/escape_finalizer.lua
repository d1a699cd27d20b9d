-- sandbox escape: finalizer
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  setmetatable({}, { __gc = function() while true do end end })
  collectgarbage()
  collectgarbage()
  ctx:route("out", "after gc")
end
