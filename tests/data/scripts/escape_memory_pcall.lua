-- sandbox escape: memory_pcall
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  -- a memory error caught by pcall, then more work: allowed, stays capped
  local ok, err = pcall(function() local t = {} for i = 1, 1e9 do t[i] = i end end)
  if ok then error("no memory error") end
  ctx:route("out", "caught: " .. tostring(err))
end
