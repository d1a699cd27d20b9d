-- sandbox escape: memory_table
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local t = {}
  for i = 1, 1e9 do t[i] = ("x"):rep(100) .. i end
end
