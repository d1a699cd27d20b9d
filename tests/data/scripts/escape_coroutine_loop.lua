-- sandbox escape: coroutine_loop
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  while true do
    local co = coroutine.create(function() while true do end end)
    coroutine.resume(co)
  end
end
