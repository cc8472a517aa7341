// AXI4-Lite slave in front of the generated register block (peakrdl etana, passthrough
// CPU interface): the checks the register map asks for that depend on the instance's
// parameters, which the generated block (laid out for N_PORTS = 64) cannot know.
//
//  * an access to port[p] with p >= N_PORTS fails (SLVERR) without reaching the block;
//  * a write of a 1 to a PERM_LO/PERM_HI bit of an output >= N_PORTS, or to a KEYS bit of a
//    key >= N_KEYS, fails (SLVERR) and leaves the register unchanged;
//  * a read of CTRL (write-only strobes) returns 0, OKAY: etana's --err-if-bad-rw would
//    answer SLVERR, the register map says "reads return 0".
//
// Everything else (unmapped addresses, writes to read-only registers) is the generated
// block's own --err-if-bad-addr / --err-if-bad-rw answer. One transaction at a time: the
// address/data of the next one are held in the input registers meanwhile.
`timescale 1ns / 1ps
`default_nettype none

module slicefab_xbar_axil #(
    parameter integer N_PORTS = 4,
    parameter integer N_KEYS = 16,
    parameter integer ADDR_WIDTH = 13
) (
    input  wire                  clk,
    input  wire                  rst,

    input  wire [ADDR_WIDTH-1:0] s_axil_awaddr,
    input  wire [2:0]            s_axil_awprot,
    input  wire                  s_axil_awvalid,
    output wire                  s_axil_awready,
    input  wire [31:0]           s_axil_wdata,
    input  wire [3:0]            s_axil_wstrb,
    input  wire                  s_axil_wvalid,
    output wire                  s_axil_wready,
    output wire [1:0]            s_axil_bresp,
    output wire                  s_axil_bvalid,
    input  wire                  s_axil_bready,
    input  wire [ADDR_WIDTH-1:0] s_axil_araddr,
    input  wire [2:0]            s_axil_arprot,
    input  wire                  s_axil_arvalid,
    output wire                  s_axil_arready,
    output wire [31:0]           s_axil_rdata,
    output wire [1:0]            s_axil_rresp,
    output wire                  s_axil_rvalid,
    input  wire                  s_axil_rready,

    // passthrough CPU interface of the generated block
    output reg                   cpuif_req,
    output reg                   cpuif_req_is_wr,
    output reg  [12:0]           cpuif_addr,
    output reg  [31:0]           cpuif_wr_data,
    output reg  [31:0]           cpuif_wr_biten,
    input  wire                  cpuif_req_stall_wr,
    input  wire                  cpuif_req_stall_rd,
    input  wire                  cpuif_rd_ack,
    input  wire                  cpuif_rd_err,
    input  wire [31:0]           cpuif_rd_data,
    input  wire                  cpuif_wr_ack,
    input  wire                  cpuif_wr_err
);
    localparam [1:0] RESP_OKAY = 2'b00;
    localparam [1:0] RESP_SLVERR = 2'b10;
    localparam [2:0] ST_IDLE = 3'd0, ST_REQ = 3'd1, ST_WAIT = 3'd2, ST_BRESP = 3'd3,
                     ST_RRESP = 3'd4;
    // register map layout (abi.regmap): port[p] at 0x100 + p * 0x40
    localparam [ADDR_WIDTH-1:0] PORT_BASE_WORD = ADDR_WIDTH'('h100 >> 6);
    localparam [ADDR_WIDTH-1:0] PORTS = ADDR_WIDTH'(N_PORTS);
    localparam [5:0] OFF_PERM_LO = 6'h00, OFF_PERM_HI = 6'h04, OFF_KEYS = 6'h14;
    localparam [12:0] CTRL_ADDR = 13'h00C;
    localparam [63:0] OUT_EXISTS = (N_PORTS >= 64) ? {64{1'b1}} : ((64'd1 << N_PORTS) - 64'd1);
    localparam [15:0] KEY_EXISTS = (N_KEYS >= 16) ? {16{1'b1}} : ((16'd1 << N_KEYS) - 16'd1);

    // holding registers of the next transaction
    reg                  aw_held, w_held, ar_held;
    reg [ADDR_WIDTH-1:0] aw_addr, ar_addr;
    reg [31:0]           w_data;
    reg [3:0]            w_strb;

    reg [2:0]  state;
    reg [1:0]  resp;
    reg [31:0] rdata;

    assign s_axil_awready = !aw_held;
    assign s_axil_wready = !w_held;
    assign s_axil_arready = !ar_held;
    assign s_axil_bvalid = state == ST_BRESP;
    assign s_axil_bresp = resp;
    assign s_axil_rvalid = state == ST_RRESP;
    assign s_axil_rresp = resp;
    assign s_axil_rdata = rdata;

    // byte enables of the held write
    wire [31:0] w_biten = {{8{w_strb[3]}}, {8{w_strb[2]}}, {8{w_strb[1]}}, {8{w_strb[0]}}};

    // port index of an address: -1 (as a large value) below the port array
    function automatic bad_port(input [ADDR_WIDTH-1:0] addr);
        reg [ADDR_WIDTH-1:0] word;
        begin
            word = addr >> 6;
            bad_port = (word >= PORT_BASE_WORD) && (word - PORT_BASE_WORD >= PORTS);
        end
    endfunction

    // a write that sets a bit of an output or key this instance does not have
    function automatic bad_bits(input [ADDR_WIDTH-1:0] addr, input [31:0] bits);
        reg [5:0] off;
        begin
            off = {addr[5:2], 2'b00};
            bad_bits = 1'b0;
            if ((addr >> 6) >= PORT_BASE_WORD) begin  // a port register
                if (off == OFF_PERM_LO) bad_bits = |(bits & ~OUT_EXISTS[31:0]);
                else if (off == OFF_PERM_HI) bad_bits = |(bits & ~OUT_EXISTS[63:32]);
                else if (off == OFF_KEYS) bad_bits = |(bits[15:0] & ~KEY_EXISTS);
            end
        end
    endfunction

    wire [12:0] aw_word = {aw_addr[12:2], 2'b00};
    wire [12:0] ar_word = {ar_addr[12:2], 2'b00};
    // address bits above the 8 KiB map (when the bus is wider) name nothing
    wire aw_high = (ADDR_WIDTH > 13) ? |(aw_addr >> 13) : 1'b0;
    wire ar_high = (ADDR_WIDTH > 13) ? |(ar_addr >> 13) : 1'b0;

    always @(posedge clk) begin
        if (rst) begin
            aw_held <= 1'b0;
            w_held <= 1'b0;
            ar_held <= 1'b0;
            aw_addr <= {ADDR_WIDTH{1'b0}};
            ar_addr <= {ADDR_WIDTH{1'b0}};
            w_data <= 32'd0;
            w_strb <= 4'd0;
            state <= ST_IDLE;
            resp <= RESP_OKAY;
            rdata <= 32'd0;
            cpuif_req <= 1'b0;
            cpuif_req_is_wr <= 1'b0;
            cpuif_addr <= 13'd0;
            cpuif_wr_data <= 32'd0;
            cpuif_wr_biten <= 32'd0;
        end else begin
            if (s_axil_awvalid && !aw_held) begin
                aw_held <= 1'b1;
                aw_addr <= s_axil_awaddr;
            end
            if (s_axil_wvalid && !w_held) begin
                w_held <= 1'b1;
                w_data <= s_axil_wdata;
                w_strb <= s_axil_wstrb;
            end
            if (s_axil_arvalid && !ar_held) begin
                ar_held <= 1'b1;
                ar_addr <= s_axil_araddr;
            end
            case (state)
                ST_IDLE: begin
                    if (aw_held && w_held) begin
                        aw_held <= 1'b0;
                        w_held <= 1'b0;
                        if (aw_high || bad_port(aw_addr) || bad_bits(aw_addr, w_data & w_biten)) begin
                            resp <= RESP_SLVERR;
                            state <= ST_BRESP;
                        end else begin
                            cpuif_req <= 1'b1;
                            cpuif_req_is_wr <= 1'b1;
                            cpuif_addr <= aw_word;
                            cpuif_wr_data <= w_data;
                            cpuif_wr_biten <= w_biten;
                            state <= ST_REQ;
                        end
                    end else if (ar_held) begin
                        ar_held <= 1'b0;
                        if (ar_high || bad_port(ar_addr)) begin
                            resp <= RESP_SLVERR;
                            rdata <= 32'd0;
                            state <= ST_RRESP;
                        end else if (ar_word == CTRL_ADDR) begin
                            resp <= RESP_OKAY;
                            rdata <= 32'd0;
                            state <= ST_RRESP;
                        end else begin
                            cpuif_req <= 1'b1;
                            cpuif_req_is_wr <= 1'b0;
                            cpuif_addr <= ar_word;
                            state <= ST_REQ;
                        end
                    end
                end
                ST_REQ, ST_WAIT: begin
                    // the request is presented for one cycle unless the block stalls it
                    if (state == ST_REQ && !(cpuif_req_is_wr ? cpuif_req_stall_wr
                                                             : cpuif_req_stall_rd)) begin
                        cpuif_req <= 1'b0;
                        state <= ST_WAIT;
                    end
                    if (cpuif_wr_ack) begin
                        cpuif_req <= 1'b0;
                        resp <= cpuif_wr_err ? RESP_SLVERR : RESP_OKAY;
                        state <= ST_BRESP;
                    end else if (cpuif_rd_ack) begin
                        cpuif_req <= 1'b0;
                        resp <= cpuif_rd_err ? RESP_SLVERR : RESP_OKAY;
                        rdata <= cpuif_rd_err ? 32'd0 : cpuif_rd_data;
                        state <= ST_RRESP;
                    end
                end
                ST_BRESP: if (s_axil_bready) state <= ST_IDLE;
                ST_RRESP: if (s_axil_rready) state <= ST_IDLE;
                default: state <= ST_IDLE;
            endcase
        end
    end

    // AxPROT carries nothing this register port distinguishes
    wire unused = &{1'b0, s_axil_awprot, s_axil_arprot};
endmodule

`default_nettype wire
