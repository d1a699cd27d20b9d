local function helper(x)
  return x.field
end

function on_message(msg, ctx)
  if ctx.message_id == "nil_index" then
    return helper(nil)
  end
  error("boom")
end
