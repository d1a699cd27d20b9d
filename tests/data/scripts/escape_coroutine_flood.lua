-- sandbox escape: coroutine_flood
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local t = {}
  for i = 1, 1e8 do
    t[i] = coroutine.create(function() coroutine.yield() end)
    coroutine.resume(t[i])
  end
end
